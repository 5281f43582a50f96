"""The Python API (issue 17 §2): the same summary as the CLI, the CLI's errors, a light `import distillctl`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import distillctl
from distillctl.errors import GateError, UsageError
from tests.conftest import REPO, run_cli

VOLATILE = ("wall_s",)


def _stable(summary: dict) -> dict:
    summary = {key: value for key, value in summary.items() if key not in VOLATILE}
    gates = dict(summary.get("gates") or {})
    gates.pop("checked_at", None)
    disk = dict(summary.get("disk") or {})
    disk.pop("run_bytes", None)  # summary.json itself is in the folder, and its wall_s has more or fewer digits
    return {**summary, "gates": gates, "disk": disk}


@pytest.mark.slow
def test_api_run_returns_the_cli_summary(ci_run_copy):
    cli = run_cli("run", "--recipe", str(ci_run_copy / "recipe.yaml"), "--out", str(ci_run_copy), "--json")
    assert cli.returncode == 0, cli.stderr[-3000:]
    cli_summary = json.loads(cli.stdout)
    summary = distillctl.run(ci_run_copy / "recipe.yaml", overrides={"out": str(ci_run_copy)}, quiet=True)
    assert isinstance(summary, distillctl.Summary)
    assert _stable(summary.to_dict()) == _stable(cli_summary)
    assert summary.to_dict() == json.loads((ci_run_copy / "summary.json").read_text())
    assert summary.student_knn == cli_summary["student"]["knn_top1"] and summary.gates_passed
    assert summary.run_dir == ci_run_copy

    with pytest.raises(GateError) as failed:
        distillctl.gate(ci_run_copy, {"min_student_knn": 100.0})
    assert failed.value.exit_code == 3 and "min_student_knn" in failed.value.message
    report = distillctl.read_summary(ci_run_copy).gates
    assert report["failed"] == ["min_student_knn"]
    assert report["results"]["min_student_knn"]["margin"] == pytest.approx(summary.student_knn - 100.0, abs=1e-6)

    evaluated = distillctl.evaluate(ci_run_copy / "export" / "student.onnx")
    assert evaluated["knn"]["20"] == pytest.approx(summary.student_knn, abs=0.01)


def test_api_raises_the_cli_errors():
    with pytest.raises(UsageError) as bad:
        distillctl.run("quickstart", overrides={"train.epochz": 3})
    assert bad.value.exit_code == 2 and "train.epochz" in bad.value.message
    with pytest.raises(UsageError):
        distillctl.run("quickstart", resume=True, restart=True)


def test_import_distillctl_stays_light():
    code = ("import sys, distillctl; assert callable(distillctl.run); "
            "print(sorted(m for m in ('torch', 'timm', 'onnx', 'onnxruntime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_export_package_is_the_api_export():
    import distillctl.export.api  # noqa: F401 - the subpackage now shadows the attribute

    with pytest.raises(Exception) as missing:
        distillctl.export("/nonexistent/run", formats=["onnx"])
    assert getattr(missing.value, "exit_code", None) == 2
