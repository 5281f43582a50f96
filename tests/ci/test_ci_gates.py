"""Quality gates (issue 17 §1): each gate passing and failing with its margin, exit 3 naming the gates,
summary.json complete whatever the exit code, re-checking without retraining."""

from __future__ import annotations

import json

import pytest

from distillctl.gates import GatesConfig, evaluate_gates, failure
from tests.ci.conftest import ci_run_args
from tests.conftest import run_cli

SUMMARY = {"student": {"knn_top1": 72.5}, "teacher": {"knn_top1": 90.0},
           "export": {"onnx-int8": {"accuracy": {"drop": 0.8, "reference_top1": 72.5, "candidate_top1": 71.7}}}}


@pytest.mark.parametrize("name, threshold, measured, margin, passed", [
    ("min_student_knn", 70.0, 72.5, 2.5, True),
    ("min_student_knn", 75.0, 72.5, -2.5, False),
    ("min_student_teacher_ratio", 0.8, 72.5 / 90.0, 72.5 / 90.0 - 0.8, True),
    ("min_student_teacher_ratio", 0.85, 72.5 / 90.0, 72.5 / 90.0 - 0.85, False),
    ("max_int8_drop", 1.0, 0.8, 0.2, True),
    ("max_int8_drop", 0.5, 0.8, -0.3, False),
])
def test_summary_gates_pass_and_fail_with_margin(tmp_path, name, threshold, measured, margin, passed):
    [result] = evaluate_gates(GatesConfig(**{name: threshold}), SUMMARY, tmp_path)
    assert result.name == name and result.passed is passed
    assert result.measured == pytest.approx(measured, abs=1e-6)
    assert result.margin == pytest.approx(margin, abs=1e-6)
    error = failure([result])
    if passed:
        assert error is None
    else:
        assert error.exit_code == 3 and name in error.message and f"{margin:+.4g}" in error.message


def test_unmeasurable_gate_fails_and_says_why(tmp_path):
    [result] = evaluate_gates(GatesConfig(max_int8_drop=1.0), {"student": {"knn_top1": 50.0}}, tmp_path)
    assert not result.passed and result.measured is None and "onnx-int8" in result.detail


def test_no_gates_means_nothing_checked(tmp_path):
    assert evaluate_gates(GatesConfig(), SUMMARY, tmp_path) == []


def test_int8_gate_without_int8_export_is_refused_before_work(tiny_teacher_file, tmp_path):
    result = run_cli(*ci_run_args(tiny_teacher_file, tmp_path / "run", "--export", "onnx",
                                  "--set", "gates.max_int8_drop=1"))
    assert result.returncode == 2 and "gates.max_int8_drop needs the INT8 export" in result.stderr
    assert not (tmp_path / "run" / "student").exists()


@pytest.mark.slow
def test_gate_verb_passes_and_fails_each_gate(ci_run_copy):
    summary = json.loads((ci_run_copy / "summary.json").read_text())
    knn, teacher = summary["student"]["knn_top1"], summary["teacher"]["knn_top1"]
    # INT8 may come out better than fp32 on this tiny run (a negative drop); give it a drop to gate on
    drop = summary["export"]["onnx-int8"]["accuracy"]["drop"] = 0.75
    (ci_run_copy / "summary.json").write_text(json.dumps(summary))
    passing = {"min_student_knn": knn - 1, "min_student_teacher_ratio": knn / teacher - 0.01,
               "max_int8_drop": drop + 0.5, "max_latency_ms": 10000}
    failing = {"min_student_knn": knn + 1, "min_student_teacher_ratio": knn / teacher + 0.01,
               "max_int8_drop": drop - 0.5, "max_latency_ms": 1e-6}
    for name in passing:
        ok = run_cli("gate", str(ci_run_copy), "--set", f"gates.{name}={passing[name]}", "--json")
        assert ok.returncode == 0, ok.stderr[-2000:]
        entry = json.loads(ok.stdout)["results"][name]
        assert entry["passed"] and entry["margin"] >= 0
        bad = run_cli("gate", str(ci_run_copy), "--set", f"gates.{name}={failing[name]}", "--json")
        assert bad.returncode == 3, bad.stderr[-2000:]
        entry = json.loads(bad.stdout)["results"][name]
        assert not entry["passed"] and entry["margin"] < 0
        assert name in bad.stderr and "measured" in bad.stderr and f"margin {entry['margin']:+.4g}" in bad.stderr
        recorded = json.loads((ci_run_copy / "summary.json").read_text())["gates"]
        assert recorded["failed"] == [name] and recorded["results"][name]["measured"] == entry["measured"]
    latency = json.loads((ci_run_copy / "summary.json").read_text())["gates"]["results"]["max_latency_ms"]
    assert "onnx batch 1 on 1 thread" in latency["detail"]


@pytest.mark.slow
def test_failed_gate_in_run_keeps_a_complete_summary_and_rechecks_without_retraining(ci_run_copy):
    checkpoints = sorted((ci_run_copy / "distill" / "checkpoints").glob("*"))
    stamps = {path: path.stat().st_mtime_ns for path in (ci_run_copy / "student" / "model.safetensors", *checkpoints)}
    manifest = json.loads((ci_run_copy / "manifest.json").read_text())
    recipe = str(ci_run_copy / "recipe.yaml")
    failed = run_cli("run", "--recipe", recipe, "--out", str(ci_run_copy), "--set", "gates.min_student_knn=100",
                     "--set", "gates.min_student_teacher_ratio=0.01")
    assert failed.returncode == 3, failed.stderr[-3000:]
    assert "1 quality gate failed: min_student_knn" in failed.stderr and "margin -" in failed.stderr
    assert "distill: finished earlier with the same inputs; skipped" in failed.stderr
    summary = json.loads((ci_run_copy / "summary.json").read_text())
    assert {"teacher", "student", "train", "eval", "export", "data", "recipe", "gates"} <= set(summary)
    assert summary["student"]["knn_top1"] > 0 and summary["train"]["steps"] > 0
    assert summary["gates"]["failed"] == ["min_student_knn"] and summary["gates"]["checked"] == 2
    passed = run_cli("run", "--recipe", recipe, "--out", str(ci_run_copy), "--set", "gates.min_student_knn=1", "--json")
    assert passed.returncode == 0, passed.stderr[-3000:]
    assert json.loads(passed.stdout)["gates"]["passed"] is True
    after = json.loads((ci_run_copy / "manifest.json").read_text())
    assert {k: v["fingerprint"] for k, v in after["stages"].items()} == \
        {k: v["fingerprint"] for k, v in manifest["stages"].items()}
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps  # nothing retrained or re-exported


@pytest.mark.slow
def test_export_gate_failure_at_end_of_run_keeps_the_whole_summary(ci_run_copy, monkeypatch):
    """Measured before: after an export gate failed (exit 3) summary.json held only the `export` key."""
    from distillctl.config import load_recipe
    from distillctl.errors import GateError
    from distillctl.export import parity
    from distillctl.pipeline import run_pipeline

    (ci_run_copy / "summary.json").unlink()
    monkeypatch.setitem(parity.TOLERANCES, "int8", parity.Tolerance("int8", mean_cosine=1.01, p1_cosine=1.01))
    recipe = load_recipe(str(ci_run_copy / "recipe.yaml"), ["export.calib_method=minmax", f"out={ci_run_copy}",
                                                             "gates.min_student_knn=1"])
    with pytest.raises(GateError, match="student.int8"):
        run_pipeline(recipe)
    summary = json.loads((ci_run_copy / "summary.json").read_text())
    assert {"teacher", "student", "train", "eval", "export", "data", "recipe", "gates"} <= set(summary)
    assert summary["export"]["passed"] is False and summary["student"]["knn_top1"] > 0
    assert summary["teacher"]["knn_top1"] > 0 and summary["gates"]["passed"] is True
