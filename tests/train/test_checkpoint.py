"""Checkpoint policy: periodic by steps and by wall time, keep-last-N, newest-loadable with a warning,
unreadable files set aside (never outranking new checkpoints), stale temp files removed, and a checkpoint
of another architecture refused in one line."""

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


def test_truncated_newest_falls_back_with_a_warning(tmp_path, log_lines):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        manager.save({"step": step, "fingerprint": "f", "weights": torch.full((4,), float(step))}, step)
    newest = tmp_path / "ckpt_000000002.pt"
    newest.write_bytes(newest.read_bytes()[:50])
    (tmp_path / ".ckpt_000000003.pt.tmp999").write_bytes(b"half")  # left by a kill during a write
    state = manager.load_latest("f")
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(4))
    err = "\n".join(log_lines)
    assert "checkpoint ckpt_000000002.pt is unreadable (" in err and "moved to unreadable/ckpt_000000002.pt" in err
    manager.save({"step": 3, "fingerprint": "f"}, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000001.pt", "ckpt_000000003.pt", "unreadable"]
    assert (tmp_path / "unreadable" / "ckpt_000000002.pt").stat().st_size == 50  # kept for inspection, unchanged


def _truncate(path, keep: int = 40) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_all_unreadable_are_set_aside_and_new_checkpoints_survive(tmp_path, log_lines):
    """Regression: every checkpoint unreadable → the run starts over; pruning (highest steps kept) used to
    delete the new step-2/4 checkpoints in favour of the unreadable step-900/901 ones."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (900, 901):
        manager.save({"step": step, "fingerprint": "f"}, step)
        _truncate(tmp_path / f"ckpt_{step:09d}.pt")
    assert manager.load_latest("f") is None
    err = "\n".join(log_lines)
    assert err.count("is unreadable") == 2 and "no readable checkpoint left" in err
    for step in (2, 4, 6):
        manager.save({"step": step, "fingerprint": "f"}, step)
    assert [step for step, _ in manager.list()] == [4, 6]
    assert sorted(p.name for p in manager.unreadable_dir.iterdir()) == ["ckpt_000000900.pt", "ckpt_000000901.pt"]
    assert manager.load_latest("f")["step"] == 6


def test_set_aside_twice_keeps_both_files(tmp_path):
    manager = CheckpointManager(tmp_path)
    for attempt in range(2):
        manager.save({"step": 5, "fingerprint": "f"}, 5)
        _truncate(tmp_path / "ckpt_000000005.pt", keep=10 + attempt)
        assert manager.load_latest("f") is None
    sizes = sorted(p.stat().st_size for p in manager.unreadable_dir.iterdir())
    assert sizes == [10, 11] and manager.list() == []


def test_training_resumes_over_unreadable_checkpoints_from_step_zero(tmp_path, log_lines):
    """End to end through the trainer: the resumed run starts at 0, ends at the same weights as a clean run,
    and its own checkpoints are the ones left."""
    clean = train(tiny_job(tmp_path / "clean", images=192, checkpoint_every_steps=2, keep_last=2))
    run = tmp_path / "run"
    train(tiny_job(run, images=192, checkpoint_every_steps=2, keep_last=2))
    checkpoints = run / "checkpoints"
    for step, path in CheckpointManager(checkpoints).list():  # older, higher-numbered and unreadable
        path.rename(checkpoints / f"ckpt_{step + 900:09d}.pt")
        _truncate(checkpoints / f"ckpt_{step + 900:09d}.pt")
    log_lines.clear()
    result = train(tiny_job(run, images=192, checkpoint_every_steps=2, keep_last=2))
    assert result.resumed_from_step is None and result.steps == clean.steps == 6
    assert any("no readable checkpoint left" in line for line in log_lines)
    assert _steps(checkpoints) == [4, 6]
    assert sorted(p.name for p in (checkpoints / "unreadable").iterdir()) == ["ckpt_000000904.pt", "ckpt_000000906.pt"]
    final = torch.load(checkpoints / "ckpt_000000006.pt", weights_only=True)["student"]
    reference = torch.load(tmp_path / "clean" / "checkpoints" / "ckpt_000000006.pt", weights_only=True)["student"]
    assert all(torch.equal(final[key], reference[key]) for key in reference)


def test_checkpoint_of_another_architecture_is_one_line(tmp_path):
    train(tiny_job(tmp_path / "run", keep_last=1))
    job = tiny_job(tmp_path / "run")
    job.student = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(InputError, match="the checkpoint does not fit this student/method") as raised:
        train(job)
    assert "\n" not in str(raised.value) and "--restart" in raised.value.hint
