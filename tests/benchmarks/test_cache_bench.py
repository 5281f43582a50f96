"""cache_bench.py's expected online/cached ratio, (teacher + student) / student, and its verdict against the
issue-15 target (within 10 %). No timing is asserted: only the arithmetic and what gets timed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import cache_bench  # noqa: E402

from distillctl.teachers.base import Teacher  # noqa: E402


def test_expected_ratio_is_teacher_plus_student_over_student():
    assert cache_bench.expected_online_over_cached(0.3, 0.2) == pytest.approx(2.5)
    assert cache_bench.expected_online_over_cached(0.0, 0.4) == 1.0
    for bad in ((0.1, 0.0), (-0.1, 0.2)):
        with pytest.raises(ValueError):
            cache_bench.expected_online_over_cached(*bad)


@pytest.mark.parametrize("measured, deviation, within", [(2.5, 0.0, True), (2.7, 0.08, True), (2.25, -0.1, True),
                                                         (2.8, 0.12, False), (1.641, -0.3436, False)])
def test_verdict_is_relative_deviation_within_ten_percent(measured, deviation, within):
    verdict = cache_bench.ratio_verdict(measured, 2.5)
    assert verdict["deviation"] == pytest.approx(deviation, abs=1e-4)
    assert verdict["within_target"] is within
    assert verdict["expected"] == 2.5 and verdict["measured"] == round(measured, 3)


def test_time_alone_times_one_call_per_batch_and_trains_only_the_student():
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=0)
    teacher = Teacher(name="t", arch="test_resnet", backbone=backbone, embed_dim=backbone.num_features,
                      sha256="0" * 64).freeze()
    teacher.set_bn_mode("eval")  # as cache_bench.main sets it
    student = timm.create_model("test_resnet", num_classes=0).train()
    head = torch.nn.Linear(student.num_features, backbone.num_features)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(head.parameters()), lr=0.1)
    args = argparse.Namespace(batch_size=4, amp="none")
    batches = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    teacher_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}

    wall, cpu = cache_bench.time_alone("teacher", batches, teacher, student, head, optimizer, args, torch.device("cpu"))
    assert len(wall) == len(cpu) == 3 and all(t > 0 for t in wall) and all(t >= 0 for t in cpu)
    assert all(torch.equal(student_before[k], v) for k, v in student.state_dict().items())  # teacher only
    wall, cpu = cache_bench.time_alone("student", batches, teacher, student, head, optimizer, args, torch.device("cpu"))
    assert len(wall) == len(cpu) == 3 and all(t > 0 for t in wall) and all(t >= 0 for t in cpu)
    assert all(torch.equal(teacher_before[k], v) for k, v in backbone.state_dict().items())
    assert not all(torch.equal(student_before[k], v) for k, v in student.state_dict().items())  # steps were taken


def test_cpu_time_verdicts_use_median_phases_and_fastest_epochs():
    def epoch(cpu_seconds, **phases):
        return {"cpu_seconds": cpu_seconds, "cpu_per_batch": phases}

    runs = {"online": [epoch(9.0, data=[0.1, 0.1, 0.3], teacher=[2.0, 3.0, 9.0], student=[2.0, 2.0, 2.0]),
                       epoch(8.0, data=[0.1], teacher=[3.0], student=[2.0])],
            "cached": [epoch(5.0, data=[0.1, 0.1], lookup=[0.0, 0.0], student=[2.0, 2.0]),
                       epoch(4.0, data=[0.1], lookup=[0.0], student=[1.9])]}
    verdict = cache_bench.cpu_time_verdicts(runs, {"teacher": [3.0, 2.0, 4.0], "student": [2.0, 1.0, 2.0]})
    assert verdict["expected_online_over_cached"] == 2.5  # (3 + 2) / 2, medians
    assert verdict["epochs"]["measured"] == 2.0 and verdict["epochs"]["within_target"] is False  # 8 / 4
    # medians: online 0.1 + 3.0 + 2.0 = 5.1, cached 0.1 + 0.0 + 2.0 = 2.1
    assert verdict["median_per_batch"]["measured"] == round(5.1 / 2.1, 3)
    assert verdict["median_per_batch"]["within_target"] is True  # 2.429 is -2.9 % from 2.5
