"""Checkpoint policy: periodic by steps and by wall time, keep-last-N, newest-loadable with a warning,
stale temp files removed, and a checkpoint of another architecture refused in one line."""

from __future__ import annotations

import torch

import pytest

from distillctl.errors import InputError
from distillctl.train.checkpoint import CheckpointManager
from distillctl.train.loop import train
from tests.faults.inprocess import tiny_job


def _steps(directory) -> list[int]:
    return [step for step, _ in CheckpointManager(directory).list()]


def test_periodic_by_steps_and_keep_last(tmp_path):
    train(tiny_job(tmp_path / "steps", images=192, checkpoint_every_steps=2, keep_last=2))  # 6 steps
    assert _steps(tmp_path / "steps" / "checkpoints") == [4, 6]  # 2 and 4 written, 2 pruned; 6 = the final one


def test_periodic_by_wall_time(tmp_path):
    train(tiny_job(tmp_path / "time", checkpoint_every_minutes=1e-9, keep_last=10))  # due after every step
    assert _steps(tmp_path / "time" / "checkpoints") == [1, 2, 3, 4]


def test_truncated_newest_falls_back_with_a_warning(tmp_path, capsys):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        manager.save({"step": step, "fingerprint": "f", "weights": torch.full((4,), float(step))}, step)
    newest = tmp_path / "ckpt_000000002.pt"
    newest.write_bytes(newest.read_bytes()[:50])
    (tmp_path / ".ckpt_000000003.pt.tmp999").write_bytes(b"half")  # left by a kill during a write
    state = manager.load_latest("f")
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(4))
    assert "checkpoint ckpt_000000002.pt is unreadable" in capsys.readouterr().err
    manager.save({"step": 3, "fingerprint": "f"}, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000001.pt", "ckpt_000000002.pt", "ckpt_000000003.pt"]


def test_checkpoint_of_another_architecture_is_one_line(tmp_path):
    train(tiny_job(tmp_path / "run", keep_last=1))
    job = tiny_job(tmp_path / "run")
    job.student = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(InputError, match="the checkpoint does not fit this student/method") as raised:
        train(job)
    assert "\n" not in str(raised.value) and "--restart" in raised.value.hint
