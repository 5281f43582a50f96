"""Resource faults: a full disk while writing a checkpoint, the student or a cache shard leaves the previous
valid state intact and stops with one clear line; out-of-memory names the batch sizes and the flag."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from distillctl.data.datasets import open_dataset
from distillctl.data.views import ViewSpec
from distillctl.errors import TrainingError
from distillctl.pipeline import build_cache_guarded
from distillctl.train.checkpoint import CheckpointManager
from distillctl.train.faults import oom_error
from distillctl.train.loop import train
from tests.faults.inprocess import _net, tiny_job
from distillctl.teachers.base import Teacher

_real_replace = os.replace


def _disk_full_for(fragment: str):
    def replace(src, dst, *args, **kwargs):
        if fragment in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _real_replace(src, dst, *args, **kwargs)
    return replace


def test_disk_full_during_training_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    job = tiny_job(tmp_path / "run", checkpoint_every_steps=1)
    monkeypatch.setattr(os, "replace", _disk_full_for("ckpt_000000002.pt"))
    with pytest.raises(TrainingError) as raised:
        train(job)
    message = str(raised.value)
    assert "ckpt_000000002.pt: No space left on device; the previous checkpoint is intact" in message
    assert "--resume" in raised.value.hint
    monkeypatch.undo()
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert files == ["ckpt_000000001.pt"]  # no temp file left, step 1 kept
    state = CheckpointManager(tmp_path / "run" / "checkpoints").load_latest("test")
    assert state["step"] == 1

    resumed = train(tiny_job(tmp_path / "run", checkpoint_every_steps=1))  # space is back: continue from step 1
    assert resumed.resumed_from_step == 1 and resumed.steps == 4


def test_disk_full_while_sealing_a_cache_shard(tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher = Teacher(name="tiny", arch="tiny", backbone=_net(6).eval(), embed_dim=6, sha256="1" * 64)
    data = open_dataset("builtin:digits").subset(range(48))
    kwargs = dict(spec=ViewSpec(size=16, family="weak"), views=2, outputs={"pooled"}, mean=(0.5,) * 3, std=(0.25,) * 3,
                  batch_size=16, shard_size=16, progress=False)
    monkeypatch.setattr(os, "replace", _disk_full_for("shard_00001"))
    with pytest.raises(TrainingError, match="No space left on device; the shards sealed so far are intact"):
        build_cache_guarded(teacher, data, tmp_path / "cache", **kwargs)
    monkeypatch.undo()
    assert (tmp_path / "cache" / "done" / "shard_00000.seal.json").is_file()
    cache = build_cache_guarded(teacher, data, tmp_path / "cache", **kwargs)  # resumes from the sealed shard
    assert cache.is_complete()


def test_out_of_memory_names_the_batch_and_the_flag(tmp_path, monkeypatch):
    job = tiny_job(tmp_path / "run", grad_accum=2)

    def oom(inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(job.method, "loss", oom)
    with pytest.raises(TrainingError) as raised:
        train(job)
    assert str(raised.value).startswith("out of ")
    assert "micro-batch 16 per process (global batch 32 = 1 process(es) x 2 accumulation step(s) x 16)" in str(raised.value)
    assert "--set train.grad_accum=4" in raised.value.hint and "--batch-size" in raised.value.hint
    assert raised.value.exit_code == 1


def test_oom_message_for_eight_gpus():
    error = oom_error(torch.OutOfMemoryError("x"), global_batch=1024, world=8, grad_accum=1, step=17)
    assert "at step 17: micro-batch 128 per process (global batch 1024 = 8 process(es) x 1 accumulation step(s) x 128)" in str(error)
    assert "train.grad_accum=2 (micro-batch 64)" in error.hint


def test_total_training_time_adds_up_across_resumes(tmp_path):
    first = train(tiny_job(tmp_path / "run", max_steps=2))
    assert first.resumed_from_step is None and first.total_wall_s == pytest.approx(first.wall_s)
    state = CheckpointManager(tmp_path / "run" / "checkpoints").load_latest("test")
    assert state["train_wall_s"] == pytest.approx(first.wall_s, abs=0.5)  # the final checkpoint carries the time
    second = train(tiny_job(tmp_path / "run"))  # resumes at step 2, runs to 4
    assert second.resumed_from_step == 2 and second.steps == 4
    assert second.total_wall_s == pytest.approx(state["train_wall_s"] + second.wall_s)
    assert second.to_dict()["total_wall_s"] > second.to_dict()["wall_s"]


def test_total_training_time_unknown_after_a_checkpoint_without_it(tmp_path):
    train(tiny_job(tmp_path / "run", max_steps=2))
    manager = CheckpointManager(tmp_path / "run" / "checkpoints")
    state = manager.load_latest("test")
    del state["train_wall_s"]  # as written by distillctl before the field existed
    manager.save(state, 2)
    resumed = train(tiny_job(tmp_path / "run"))
    assert resumed.resumed_from_step == 2 and resumed.total_wall_s is None
    assert resumed.to_dict()["total_wall_s"] is None
