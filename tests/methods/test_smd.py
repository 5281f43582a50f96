"""SMD: the vectorised loss against a per-anchor loop of the paper's formula, edge cases, schedule."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from distillctl.methods.base import TeacherDims
from distillctl.methods.smd import SMD, SMDParams, smd_loss
from method_harness import STUDENT_DIM, TEACHER_DIMS, TinyNet, TinyTeacher, make_images, make_inputs


def _norm(v: list[float]) -> list[float]:
    length = math.sqrt(sum(x * x for x in v))
    return [x / length for x in v]


def _dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def reference_smd(teacher: torch.Tensor, student: torch.Tensor, tau: float) -> float:
    """Loop over anchors: negatives N_i = {j : Dtt[i,j] > Dts[i,i]}, hardest pos/neg, weights, softplus."""
    t = [_norm(row) for row in teacher.tolist()]
    s = [_norm(row) for row in student.tolist()]
    n = len(t)
    total = 0.0
    for i in range(n):
        self_dist = _dist(t[i], s[i])
        negatives = [j for j in range(n) if _dist(t[i], t[j]) > self_dist]
        positives = [j for j in range(n) if j not in negatives]
        p = max(positives, key=lambda j: _dist(t[i], s[j]))
        w_p = max(0.0, _dist(t[i], s[p]) - _dist(t[i], t[p]))
        z = w_p * _dist(t[i], s[p])
        if negatives:
            a = min(negatives, key=lambda j: _dist(t[i], s[j]))
            w_a = max(0.0, _dist(t[i], t[a]) - _dist(t[i], s[a]))
            z -= w_a * _dist(t[i], s[a])
        total += math.log1p(math.exp(z / tau))
    return total / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smd_loss_matches_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    teacher, student = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    loss, _ = smd_loss(teacher, student, 0.5)
    assert float(loss) == pytest.approx(reference_smd(teacher, student, 0.5), rel=1e-9, abs=1e-12)


def test_anchor_without_negatives_keeps_only_positive_term() -> None:
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(5, 4, generator=g, dtype=torch.float64)
    student = torch.randn(5, 4, generator=g, dtype=torch.float64)
    student[0] = -teacher[0]  # Dts[0,0] = 2 ≥ every teacher distance: anchor 0 has no negatives
    loss, stats = smd_loss(teacher, student, 0.3)
    assert stats["no_negative_frac"] == pytest.approx(1 / 5)
    assert float(loss) == pytest.approx(reference_smd(teacher, student, 0.3), rel=1e-9)
    assert torch.isfinite(loss)


def test_student_equal_to_teacher_gives_log2() -> None:
    teacher = torch.randn(7, 4, dtype=torch.float64)
    loss, _ = smd_loss(teacher, teacher.clone() * 3.0, 0.04)  # scale is removed by the normalisation
    assert float(loss) == pytest.approx(math.log(2), abs=1e-5)  # all weights are zero: softplus(0)


def test_gradient_flows_only_to_student() -> None:
    teacher = torch.randn(6, 4, requires_grad=True)
    student = torch.randn(6, 4, requires_grad=True)
    loss, _ = smd_loss(teacher, student, 0.1)
    loss.backward()
    assert teacher.grad is None and student.grad is not None and torch.isfinite(student.grad).all()


def test_warmup_term_and_temperature_switch() -> None:
    method = SMD(SMDParams(), STUDENT_DIM, TEACHER_DIMS)
    assert method.temperature == 0.04
    student = TinyNet(STUDENT_DIM)
    student.pretrained_cfg = {"architecture": "efficientnet_b0"}
    method.setup(student)
    assert method.temperature == 0.004
    teacher = TinyTeacher()
    images = make_images(method, 6, 16)
    warm, logs = method.loss(make_inputs(method, student, [teacher], images, epoch=1.5))
    late, _ = method.loss(make_inputs(method, student, [teacher], images, epoch=2.0))
    assert float(warm.detach()) == pytest.approx(-logs["cos"] + logs["smd"], rel=1e-5)
    assert float(late.detach()) == pytest.approx(logs["smd"], rel=1e-5)
    assert method.requirements(16).teacher_outputs == frozenset({"pooled"})
    fixed = SMD(SMDParams(temperature=0.1), STUDENT_DIM, TEACHER_DIMS)
    fixed.setup(student)
    assert fixed.temperature == 0.1


def test_params_reject_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        SMDParams(tau=0.1)
    assert SMDParams().teacher_bn == "eval"
    assert SMD(SMDParams(teacher_feature="projection"), 4, TeacherDims(10, 3)).head.out_features == 3
