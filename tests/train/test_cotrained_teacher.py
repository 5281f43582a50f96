"""Co-trained teachers: their parameters train in their own optimiser group, their BatchNorm in train mode;
a killed run resumes bit-exactly, teacher included; a feature cache is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from distillctl.errors import InputError
from distillctl.train.faults import KILL_AT_STEP_ENV
from distillctl.train.loop import train
from tests.conftest import REPO
from tests.train.contract_helpers import cotrained_job, probe_job, tiny_teacher


@pytest.mark.slow
def test_teacher_trains_in_its_own_group(tmp_path):
    job = cotrained_job(tmp_path / "run")
    job.train.max_steps = 2
    before = {k: v.clone() for k, v in job.teacher.state_dict().items()}
    train(job)
    after = job.teacher.state_dict()
    assert not after["backbone.conv1.0.weight"].equal(before["backbone.conv1.0.weight"])
    assert not after["backbone.bn1.running_mean"].equal(before["backbone.bn1.running_mean"])  # BN in train mode
    recorded = job.method.recorded[-1]
    assert recorded.teacher is job.teacher and recorded.teacher_outputs[0]["pooled"].requires_grad
    state = torch.load(tmp_path / "run" / "checkpoints" / "ckpt_000000002.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr_scale"] == 0.5
    # step 2's lr (cosine from 0.05 over 8 steps, taken at step 1) halved in the teacher's group
    assert groups[1]["lr"] == pytest.approx(0.5 * groups[0]["lr"]) and groups[0]["lr"] < 0.05
    assert state["teacher"]["backbone.conv1.0.weight"].equal(after["backbone.conv1.0.weight"])


def test_frozen_teacher_stays_frozen(tmp_path):
    job = probe_job(tmp_path / "run")
    job.train.max_steps = 1
    before = {k: v.clone() for k, v in job.teacher.state_dict().items()}
    train(job)
    assert all(v.equal(before[k]) for k, v in job.teacher.state_dict().items())


def test_cache_refused_for_cotrained_teacher_and_teacher_taps_it_lacks(tmp_path):
    for params, words in (({"teacher_mode": "co_trained"}, "a co-trained teacher"),
                          ({"teacher_taps": ("stage:-1",)}, "teacher taps stage:-1, which its feature cache does not")):
        job = probe_job(tmp_path / "run", **params)
        job.cache = object()  # a cache without taps: refused before it is touched
        with pytest.raises(InputError, match=words):
            train(job)


def test_teacher_taps_arrive_in_the_teacher_outputs(tmp_path):
    job = probe_job(tmp_path / "run", teacher_taps=("stage:-1", "stage:1"))
    job.train.max_steps = 1
    train(job)
    outputs = job.method.recorded[0].teacher_outputs[1]
    teacher = tiny_teacher()
    assert set(outputs) == {"pooled", "stage:-1", "stage:1"}
    assert outputs["stage:-1"].shape == (16, teacher.backbone.feature_info[-1]["num_chs"], 1, 1)
    assert not outputs["stage:-1"].requires_grad


def _run(out, env=None, *extra: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *launcher, "-m", "tests.train.contract_helpers", str(out), *extra], cwd=REPO,
                          env=full, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_killed_cotrained_run_resumes_bit_exactly(tmp_path):
    reference = _run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = _run(tmp_path / "killed", {KILL_AT_STEP_ENV: "5"})  # checkpoint at step 4, killed after step 5
    assert killed.returncode == 137
    resumed = _run(tmp_path / "killed")
    assert resumed.returncode == 0 and "from step 4" in resumed.stdout + resumed.stderr  # progress start line
    expected = load_file(str(tmp_path / "reference" / "final.safetensors"))
    got = load_file(str(tmp_path / "killed" / "final.safetensors"))
    assert expected.keys() == got.keys() and any(k.startswith("teacher.") for k in got)
    for key in expected:
        assert expected[key].equal(got[key]), key


@pytest.mark.slow
def test_two_processes_average_the_teacher_gradients(tmp_path):
    """Two gloo ranks (8 images each) equal one process with grad_accum=2 (per-micro-batch BN either way):
    the teacher's gradients are averaged across ranks like the student's, and both ranks hold the same teacher."""
    single = _run(tmp_path / "single", None, "2")
    assert single.returncode == 0, single.stderr[-2000:]
    ranks = _run(tmp_path / "ddp", None, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    expected = load_file(str(tmp_path / "single" / "final.safetensors"))
    rank0 = load_file(str(tmp_path / "ddp" / "final.safetensors"))
    rank1 = load_file(str(tmp_path / "ddp" / "final_rank1.safetensors"))
    initial = {f"teacher.{k}": v for k, v in tiny_teacher().state_dict().items()}
    moved = 0.0
    for key, value in expected.items():
        if not value.is_floating_point() or "running_" in key:
            continue
        if key.startswith(("teacher.", "method.seen.")):  # one averaged update; per-sample table all-gathered
            assert rank0[key].equal(rank1[key]), key
            moved = max(moved, float((value - initial[key]).abs().max()))
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert moved > 1e-3  # the teacher did train
    for key in ("method.seen.values", "method.seen.written"):  # every rank holds the whole per-sample table
        assert rank0[key].equal(expected[key]) and rank1[key].equal(expected[key]), key
    assert bool(rank1["method.seen.written"].all())
