"""A non-finite loss stops the run with exit 1 and a clear line, keeping the last good checkpoint."""

from __future__ import annotations

import pytest
import torch

from distillctl.methods.simreg import SimReg
from tests.conftest import temporary_methods, tiny_run_args


class _ExplodingSimReg(SimReg):
    """SimReg whose loss turns NaN at step 3 (test-only method)."""

    name = "test-exploding"

    def loss(self, inputs):
        loss, logs = super().loss(inputs)
        if inputs.step >= 3:
            loss = loss * torch.tensor(float("nan"))
        return loss, logs


@pytest.fixture
def exploding_method():
    with temporary_methods(_ExplodingSimReg):
        yield _ExplodingSimReg.name


def test_nan_loss_stops_with_exit_1_and_keeps_checkpoint(tmp_path, tiny_teacher_file, capsys, exploding_method):
    from distillctl.cli import main

    out = tmp_path / "run"
    args = tiny_run_args(tiny_teacher_file, out, "--teacher-mode", "online", "--set", "train.checkpoint_every_steps=2",
                         method=exploding_method)
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step 3" in err
    checkpoints = sorted((out / "distill" / "checkpoints").glob("ckpt_*.pt"))
    assert [p.name for p in checkpoints] == ["ckpt_000000002.pt"]
    state = torch.load(checkpoints[0], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
    assert not (out / "student" / "model.safetensors").exists()


def test_nan_between_log_steps_stops_at_the_next_log_step(tmp_path, tiny_teacher_file, capsys, exploding_method):
    """The finiteness check is read at log steps (no per-step host sync): a NaN at step 3 stops the run at log
    step 4 with the same line and exit code, and no metrics row is written after it."""
    import json

    from distillctl.cli import main

    out = tmp_path / "run"
    args = tiny_run_args(tiny_teacher_file, out, "--teacher-mode", "online", "--set", "train.log_every=2",
                         "--set", "train.checkpoint_every_minutes=null", method=exploding_method)
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at step 3 (epoch 0)" in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2]
    assert not list((out / "distill" / "checkpoints").glob("ckpt_*.pt"))
