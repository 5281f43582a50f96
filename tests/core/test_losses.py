"""SimReg and SEED losses against loop-based computations of the papers' formulas."""

import math

import torch

from distillctl.methods.seed import seed_loss
from distillctl.methods.simreg import simreg_head, simreg_loss


def _norm(v):
    length = math.sqrt(sum(x * x for x in v))
    return [x / length for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def test_simreg_loss_matches_loop():
    torch.manual_seed(0)
    pred, target = torch.randn(5, 7), torch.randn(5, 7)
    expected = 0.0
    for p, t in zip(pred.tolist(), target.tolist()):
        expected += 2 - 2 * _dot(_norm(p), _norm(t))
    expected /= 5
    assert abs(float(simreg_loss(pred, target)) - expected) < 1e-5


def test_simreg_head_layout():
    head = simreg_head(16, 24)
    linear = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(16, 32), (32, 16), (16, 32), (32, 24)]
    # BN+ReLU after layers 1 and 3 only
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "Linear", "BatchNorm1d", "ReLU", "Linear"]


def _loop_seed(student, teacher, queue, tau_s, tau_t):
    total = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        anchors = [t] + queue.tolist()
        t_logits = [_dot(t, a) / tau_t for a in anchors]
        s_logits = [_dot(s, a) / tau_s for a in anchors]
        t_max, s_max = max(t_logits), max(s_logits)
        t_z = sum(math.exp(v - t_max) for v in t_logits)
        s_lse = s_max + math.log(sum(math.exp(v - s_max) for v in s_logits))
        total += -sum(math.exp(tl - t_max) / t_z * (sl - s_lse) for tl, sl in zip(t_logits, s_logits))
    return total / len(student)


def test_seed_loss_matches_loop_for_several_temperatures():
    torch.manual_seed(1)
    student = torch.nn.functional.normalize(torch.randn(4, 6, dtype=torch.float64), dim=1)
    teacher = torch.nn.functional.normalize(torch.randn(4, 6, dtype=torch.float64), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(9, 6, dtype=torch.float64), dim=1)
    for tau_s, tau_t in [(0.2, 1e-4), (0.2, 0.07), (0.5, 1.0)]:
        got = float(seed_loss(student, teacher, queue, tau_s, tau_t))
        assert abs(got - _loop_seed(student, teacher, queue, tau_s, tau_t)) < 1e-8


def test_seed_tiny_teacher_temperature_is_infonce_with_teacher_positive():
    torch.manual_seed(2)
    student = torch.nn.functional.normalize(torch.randn(3, 5, dtype=torch.float64), dim=1)
    teacher = torch.nn.functional.normalize(torch.randn(3, 5, dtype=torch.float64), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1)
    logits = torch.cat([(student * teacher).sum(1, keepdim=True), student @ queue.t()], 1) / 0.2
    infonce = torch.nn.functional.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    assert abs(float(seed_loss(student, teacher, queue, 0.2, 1e-4)) - float(infonce)) < 1e-6
