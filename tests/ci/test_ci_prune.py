"""Run folders sized for their content (issue 17 §8): a successful run keeps its newest checkpoint and the final
pretrained teacher; what it removed and the folder size land in summary.json; a pruned run still skips its stages."""

from __future__ import annotations

import json

import pytest

from distillctl.prune import prune_run
from tests.conftest import run_cli


def _touch(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_prune_keeps_the_newest_checkpoint_and_the_final_teacher(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30):
        _touch(run / "distill" / "checkpoints" / f"ckpt_{step:09d}.pt", 100)
    _touch(run / "distill" / "checkpoints" / ".ckpt_000000040.pt.tmp123", 7)
    _touch(run / "student" / "model.safetensors", 5)
    _touch(run / "student" / "heads.safetensors", 5)
    _touch(run / "cache" / "pooled" / "shard_00000.npy", 50)
    for step in (5, 9):
        _touch(run / "teacher_pretrain" / "distill" / "checkpoints" / f"ckpt_{step:09d}.pt", 1000)
    _touch(run / "teacher_pretrain" / "student" / "model.safetensors", 11)
    _touch(run / "teacher_pretrain_1" / "distill" / "checkpoints" / "ckpt_000000003.pt", 1000)  # no final teacher

    report = prune_run(run)
    assert sorted(report["removed"]) == ["distill/checkpoints/.ckpt_000000040.pt.tmp123",
                                         "distill/checkpoints/ckpt_000000010.pt", "distill/checkpoints/ckpt_000000020.pt",
                                         "teacher_pretrain/distill/checkpoints/ckpt_000000005.pt",
                                         "teacher_pretrain/distill/checkpoints/ckpt_000000009.pt"]
    assert report["freed_bytes"] == 100 + 100 + 7 + 2000
    assert (run / "distill" / "checkpoints" / "ckpt_000000030.pt").is_file()
    assert (run / "teacher_pretrain_1" / "distill" / "checkpoints" / "ckpt_000000003.pt").is_file()
    assert report["run_bytes"] == 100 + 5 + 5 + 50 + 11 + 1000


@pytest.mark.slow
def test_quickstart_keeps_one_checkpoint_and_the_final_teacher_and_reruns_without_training(tmp_path):
    out = tmp_path / "qs"
    args = ("run", "--recipe", "quickstart", "--out", str(out), "--set", "teacher.pretrain.epochs=1",
            "--set", "train.epochs=1", "--set", "train.checkpoint_every_steps=5", "--json")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    disk = json.loads(first.stdout)["disk"]
    assert [p.name for p in (out / "distill" / "checkpoints").glob("*.pt")] == ["ckpt_000000022.pt"]
    assert not list((out / "teacher_pretrain").rglob("*.pt"))
    assert (out / "teacher_pretrain" / "student" / "model.safetensors").is_file()
    assert disk["pruned_bytes"] > 0 and "teacher_pretrain/distill/checkpoints/ckpt_000000011.pt" in disk["pruned"]
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(step counters below count this stage)" not in second.stderr  # neither teacher nor student trained
    assert second.stderr.count("finished earlier with the same inputs; skipped") >= 2
