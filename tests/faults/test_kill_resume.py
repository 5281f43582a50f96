"""kill -9 at several points, SIGTERM, and a truncated newest checkpoint: every resume ends with the weights
of the uninterrupted run, bit for bit. (A kill inside an epoch alone is also in tests/core/test_resume.py.)"""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.faults.run_helpers import assert_bit_exact, signal_when_paused, small_run_args, start_cli

pytestmark = pytest.mark.slow  # CLI training runs / several processes


@pytest.fixture(scope="module")
def reference(tiny_teacher_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("kill") / "reference"
    result = run_cli(*small_run_args(tiny_teacher_file, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_kill_in_epoch_truncated_checkpoint_and_kill_during_checkpoint_write(tiny_teacher_file, reference, tmp_path):
    out = tmp_path / "run"
    args = small_run_args(tiny_teacher_file, out)
    checkpoints = out / "distill" / "checkpoints"

    killed = run_cli(*args, env={"DISTILLCTL_TEST_KILL_AT_STEP": "7"})  # kill -9 inside the epoch
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["ckpt_000000003.pt", "ckpt_000000006.pt"]

    newest = checkpoints / "ckpt_000000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated newest checkpoint
    in_write = run_cli(*args, "--resume", env={"DISTILLCTL_TEST_KILL_IN_CHECKPOINT": "6"})
    assert in_write.returncode == 137, in_write.stderr[-2000:]
    assert "checkpoint ckpt_000000006.pt is unreadable" in in_write.stderr and "falling back" in in_write.stderr
    assert "resuming distill from step 3/8" in in_write.stderr
    assert any(p.name.startswith(".ckpt_000000006.pt.tmp") for p in checkpoints.iterdir())  # died mid-write

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming distill from step 3/8" in resumed.stderr
    assert not [p.name for p in checkpoints.iterdir() if ".tmp" in p.name]
    assert_bit_exact(reference, out)


def test_sigterm_writes_a_checkpoint_exits_4_and_resumes_exactly(tiny_teacher_file, reference, tmp_path):
    out = tmp_path / "run"
    args = small_run_args(tiny_teacher_file, out)
    code, _, stderr = signal_when_paused(start_cli(*args, env={"DISTILLCTL_TEST_PAUSE_AT_STEP": "5"}),
                                         out / "distill" / "paused.0")
    assert code == 4, stderr[-2000:]
    assert "received signal 15; checkpoint written at step 5" in stderr and "--resume" in stderr
    assert (out / "distill" / "checkpoints" / "ckpt_000000005.pt").is_file()
    assert json.loads((out / "manifest.json").read_text())["stages"]["distill"]["status"] == "running"

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming distill from step 5/8" in resumed.stderr
    assert_bit_exact(reference, out)


def test_kill_during_cache_build_then_rerun(tiny_teacher_file, tmp_path):
    def args(out):  # 256 images x 4 views, 64 images per teacher batch: 4 cache batches
        return small_run_args(tiny_teacher_file, out, "--set", "eval.batch_size=256", mode="cached")

    full = run_cli(*args(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]
    killed = run_cli(*args(tmp_path / "run"), env={"DISTILLCTL_TEST_KILL_IN_CACHE_BATCH": "2"})
    assert killed.returncode == 137, killed.stderr[-2000:]
    manifest = json.loads((tmp_path / "run" / "cache" / "manifest.json").read_text())
    assert not manifest["complete"]
    assert "cache" not in json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]

    rerun = run_cli(*args(tmp_path / "run"))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "cache" / "manifest.json").read_text())["complete"]
    assert_bit_exact(tmp_path / "full", tmp_path / "run")
