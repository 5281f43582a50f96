"""Exact resume: a run killed mid-epoch and resumed ends with the same weights, bit for bit."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cli, tiny_run_args


def _weights(run_dir):
    return {name: load_file(str(run_dir / "student" / name)) for name in ("model.safetensors", "heads.safetensors")}


@pytest.mark.slow
@pytest.mark.parametrize("mode, method, extra", [
    ("online", "simreg", []),
    ("cached", "seed", ["--set", "method.params.queue_size=100"]),  # queue wraps: 100 is not a multiple of 64
])
def test_kill_mid_epoch_then_resume_is_bit_exact(tmp_path, tiny_teacher_file, mode, method, extra):
    def args(out):
        return tiny_run_args(tiny_teacher_file, out, "--teacher-mode", mode, "--set", "train.checkpoint_every_steps=5",
                             *extra, method=method)

    full = run_cli(*args(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]

    killed = run_cli(*args(tmp_path / "resumed"), env={"DISTILLCTL_TEST_KILL_AT_STEP": "31"})  # epoch 2 of 2, step 9/22
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert not (tmp_path / "resumed" / "student" / "model.safetensors").exists()

    resumed = run_cli(*args(tmp_path / "resumed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming distill from step 30" in resumed.stderr

    expected, got = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    for name in expected:
        assert expected[name].keys() == got[name].keys()
        for key in expected[name]:
            assert expected[name][key].equal(got[name][key]), f"{name}:{key} differs after resume"


def test_resume_without_checkpoint_is_a_usage_error(tmp_path, tiny_teacher_file):
    result = run_cli(*tiny_run_args(tiny_teacher_file, tmp_path / "run"), "--resume")
    assert result.returncode == 2
    assert "no checkpoint to resume from" in result.stderr


@pytest.mark.slow
def test_restart_starts_a_fresh_metrics_file(tmp_path, tiny_teacher_file):
    args = tiny_run_args(tiny_teacher_file, tmp_path / "run", "--set", "train.max_steps=4", "--set",
                         "train.log_every=2", "--teacher-mode", "online")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = run_cli(*args, "--restart")
    assert again.returncode == 0, again.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("stage") == "distill"]
    assert steps == [2, 4]  # one training's lines, not both
    assert (tmp_path / "run" / "metrics.jsonl.prev").read_text() == before
