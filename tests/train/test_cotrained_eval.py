"""The eval stage scores the trained co-trained teacher (student/teacher_cotrained.safetensors), also on a rerun that
skips the distill stage and so starts from the untrained teacher."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli

sys.path.insert(0, str(REPO / "tests" / "methods"))


@pytest.mark.slow
def test_rerun_evaluates_the_trained_cotrained_teacher(tmp_path: Path) -> None:
    from cotrained_e2e import _args

    out = tmp_path / "run"
    base = _args("dogo", out, ["--teacher", "scratch", "--teacher-arch", "tiny-cnn"],
                 ["--set", "method.params.hidden_dim=32", "--set", "eval.teacher=true",
                  "--set", "eval.random_student=false"])
    first = run_cli(*base, "--set", "eval.knn_k=[5]", "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    trained = summary["eval"]["teacher"]["knn"]["5"]
    threads = summary["train"]["threads"]  # the intra-op thread choice is recorded (tests run with OMP_NUM_THREADS=1)
    assert (threads["threads"], threads["source"]) == (1, "OMP_NUM_THREADS") and "1 intra-op thread" in first.stderr
    # another k: the eval stage reruns, the distill stage is skipped (the teacher object is the untrained one)
    again = run_cli(*base, "--set", "eval.knn_k=[5,1]", "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "distill: finished earlier" in again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["teacher"]["knn"]["5"] == trained
    # the co-trained teacher exports behind the same gates: its backbone weights, ONNX parity passed
    exported = run_cli("export", str(out), "--teacher-cotrained", "--format", "onnx", "--json")
    assert exported.returncode == 0, exported.stderr[-3000:]
    report = json.loads(exported.stdout)
    assert report["onnx"]["parity"]["passed"] and (out / "teacher_cotrained" / "export" / "student.onnx").is_file()
    teacher = load_file(str(out / "student" / "teacher_cotrained.safetensors"))
    backbone = load_file(str(out / "teacher_cotrained" / "student" / "model.safetensors"))
    assert backbone and all(backbone[k].equal(teacher["backbone." + k]) for k in backbone)
    assert len(backbone) == sum(k.startswith("backbone.") for k in teacher)
    no_teacher = run_cli("export", str(tmp_path), "--teacher-cotrained")
    assert no_teacher.returncode == 2 and "no co-trained teacher" in no_teacher.stderr
    # and it is not the untrained scratch teacher's score: evaluating with the co-trained weights removed fails loudly
    (out / "student" / "teacher_cotrained.safetensors").unlink()
    missing = run_cli(*base, "--set", "eval.knn_k=[5,2]", "--json")
    assert missing.returncode == 1 and "co-trained teacher's weights are missing" in missing.stderr
