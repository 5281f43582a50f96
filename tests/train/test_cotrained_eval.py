"""The eval stage scores the trained co-trained teacher (student/teacher_cotrained.safetensors), also on a rerun that
skips the distill stage and so starts from the untrained teacher."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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
    # another k: the eval stage reruns, the distill stage is skipped (the teacher object is the untrained one)
    again = run_cli(*base, "--set", "eval.knn_k=[5,1]", "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "distill: finished earlier" in again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["teacher"]["knn"]["5"] == trained
    # and it is not the untrained scratch teacher's score: evaluating with the co-trained weights removed fails loudly
    (out / "student" / "teacher_cotrained.safetensors").unlink()
    missing = run_cli(*base, "--set", "eval.knn_k=[5,2]", "--json")
    assert missing.returncode == 1 and "co-trained teacher's weights are missing" in missing.stderr
