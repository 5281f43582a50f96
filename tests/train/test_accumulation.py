"""Gradient accumulation is real: k micro-batches give the step of one full batch (no BatchNorm involved,
so the only difference is float summation order), and bad batch splits are clear usage errors."""

from __future__ import annotations

import pytest
import torch

from distillctl.errors import InputError
from distillctl.train.loop import batch_split, train
from tests.faults.inprocess import tiny_job


def _final_state(job) -> dict[str, torch.Tensor]:
    train(job)
    return {**{f"s.{k}": v.clone() for k, v in job.student.state_dict().items()},
            **{f"m.{k}": v.clone() for k, v in job.method.state_dict().items()}}


def test_accumulation_matches_one_full_batch(tmp_path):
    full = _final_state(tiny_job(tmp_path / "full", grad_accum=1))
    for accum in (2, 4):
        accumulated = _final_state(tiny_job(tmp_path / f"accum{accum}", grad_accum=accum))
        assert full.keys() == accumulated.keys()
        moved = max(float((full[k] - tiny_job(tmp_path / "init").student.state_dict()[k[2:]]).abs().max())
                    for k in full if k.startswith("s."))
        assert moved > 1e-3  # the weights did change: the comparison below is not vacuous
        for key in full:
            torch.testing.assert_close(accumulated[key], full[key], rtol=1e-4, atol=1e-6, msg=key)


def test_accumulation_changes_the_micro_batch_not_the_global_batch():
    assert batch_split(256, 8, 1) == (32, 32)
    assert batch_split(256, 8, 4) == (32, 8)
    assert batch_split(256, 1, 4) == (256, 64)
    with pytest.raises(InputError, match="divisible by the world size 3"):
        batch_split(256, 3, 1)
    with pytest.raises(InputError, match="not divisible by train.grad_accum=3"):
        batch_split(256, 2, 3)
