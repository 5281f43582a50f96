"""Two gloo processes on CPU (torchrun via ``--nproc 2``) against one process with the same global batch,
and a preemption that reaches one rank only, resumed on a different world size. Cached teacher mode, so
the pipeline's cache build runs on both ranks too (shards split by rank, barrier before training)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.faults.run_helpers import max_difference, signal_when_paused, small_run_args, start_cli

pytestmark = pytest.mark.slow  # CLI training runs / several processes


@pytest.fixture(scope="module")
def one_process(tiny_teacher_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "one"
    result = run_cli(*small_run_args(tiny_teacher_file, out, "--set", "train.sync_bn=true", mode="cached"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_processes_with_sync_bn_match_one_process(tiny_teacher_file, one_process, tmp_path):
    out = tmp_path / "two"
    result = run_cli(*small_run_args(tiny_teacher_file, out, "--set", "train.sync_bn=true", "--json", "--nproc", "2",
                                         mode="cached"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # exactly one JSON object: only rank 0 prints
    train = summary["train"]
    assert (train["world_size"], train["per_process_batch"], train["global_batch"], train["sync_bn"]) == (2, 16, 32, True)
    assert train["lr"] == 0.02 and train["lr_scaling"] == "none" and train["teacher_mode"] == "cached"
    cache = json.loads((out / "cache" / "manifest.json").read_text())
    assert cache["complete"] and cache["build"]["world_size"] == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]  # rank 0 alone writes metrics
    worst, where = max_difference(one_process, out)
    assert worst < 1e-3, (worst, where)  # float reduction order only; without sync BN it is ~1e-2
    single = json.loads((one_process / "summary.json").read_text())
    assert summary["eval"]["protocol"] == single["eval"]["protocol"]  # eval sharded over 2 ranks, gathered on rank 0
    assert abs(summary["student"]["knn_top1"] - single["student"]["knn_top1"]) <= 2.0
    assert summary["eval"]["random_student"] == single["eval"]["random_student"]  # same seeded init, same bank


def test_sigterm_to_one_rank_stops_all_then_resume_on_one_process(tiny_teacher_file, one_process, tmp_path):
    out = tmp_path / "preempted"
    args = small_run_args(tiny_teacher_file, out, "--set", "train.sync_bn=true", mode="cached")
    process = start_cli(*args, "--nproc", "2", env={"DISTILLCTL_TEST_PAUSE_AT_STEP": "4:1"})
    code, _, stderr = signal_when_paused(process, out / "distill" / "paused.1")
    assert code != 0
    assert "received signal 15; checkpoint written at step 4" in stderr  # rank 1, which got the signal
    assert "received a signal on another rank; checkpoint written at step 4" in stderr  # rank 0 agreed
    assert (out / "distill" / "checkpoints" / "ckpt_000000004.pt").is_file()
    assert not (out / "student" / "model.safetensors").exists()

    resumed = run_cli(*args, "--resume")  # one process now: same global batch, same data order
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming distill from step 4/8 (checkpoint written by 2 processes, now 1)" in resumed.stderr
    worst, where = max_difference(one_process, out)
    assert worst < 1e-3, (worst, where)


@pytest.mark.slow
def test_two_processes_without_sync_bn_equal_one_process_accumulating_two(tiny_teacher_file, tmp_path):
    """Per-rank BN on 16 rows = per-micro-batch BN on the same 16 rows: the parameters agree bit for bit
    (gradient averaging over ranks = accumulation over micro-batches); only BN running statistics, which
    each rank tracks alone, differ."""
    accumulated = run_cli(*small_run_args(tiny_teacher_file, tmp_path / "accum", "--set", "train.grad_accum=2"))
    assert accumulated.returncode == 0, accumulated.stderr[-3000:]
    ranks = run_cli(*small_run_args(tiny_teacher_file, tmp_path / "ranks", "--nproc", "2"))
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert max_difference(tmp_path / "accum", tmp_path / "ranks", skip_running_stats=True)[0] == 0.0
    assert max_difference(tmp_path / "accum", tmp_path / "ranks")[0] > 1e-3  # running stats: per rank vs all micro-batches
