"""LARS and the learning-rate schedule (train/optim.py) against independent loop-based computations."""

from __future__ import annotations

import math

import pytest
import torch

from distillctl.train.optim import LARS, learning_rate


def _lars_reference(params: list[list[float]], grads: list[list[list[float]]], shapes, lr: float, momentum: float,
                    weight_decay: float, eta: float) -> list[list[float]]:
    """Plain-Python LARS over several steps: for weights (ndim > 1) g ← g + wd·w, scaled by the trust ratio
    η·‖w‖/‖g‖ (1 when either norm is 0); biases/norm parameters (ndim 1) take the raw gradient; then heavy-ball
    momentum v ← m·v + g and w ← w − lr·v."""
    weights = [list(p) for p in params]
    buffers = [[0.0] * len(p) for p in params]
    for step_grads in grads:
        for i, (w, g, shape) in enumerate(zip(weights, step_grads, shapes)):
            if len(shape) > 1:
                g = [gj + weight_decay * wj for gj, wj in zip(g, w)]
                w_norm = math.sqrt(sum(x * x for x in w))
                g_norm = math.sqrt(sum(x * x for x in g))
                trust = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
                g = [trust * gj for gj in g]
            buffers[i] = [momentum * b + gj for b, gj in zip(buffers[i], g)]
            weights[i] = [wj - lr * b for wj, b in zip(w, buffers[i])]
    return weights


def test_lars_matches_loop_over_three_steps():
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    params = [torch.nn.Parameter(torch.randn(*shape, generator=generator, dtype=torch.float64)) for shape in shapes]
    params[2].data.zero_()  # a zero weight: trust ratio 1
    start = [p.detach().flatten().tolist() for p in params]
    optimizer = LARS(params, lr=0.3, momentum=0.9, weight_decay=1e-2, eta=0.02)
    grads = []
    for _ in range(3):
        step = [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in shapes]
        grads.append([g.flatten().tolist() for g in step])
        for param, grad in zip(params, step):
            param.grad = grad.clone()
        optimizer.step()
    expected = _lars_reference(start, grads, shapes, lr=0.3, momentum=0.9, weight_decay=1e-2, eta=0.02)
    for param, reference in zip(params, expected):
        assert param.detach().flatten().tolist() == pytest.approx(reference, rel=1e-12, abs=1e-14)


def test_lars_skips_parameters_without_gradient():
    param = torch.nn.Parameter(torch.ones(2, 2))
    LARS([param], lr=1.0).step()
    assert torch.equal(param.detach(), torch.ones(2, 2))


def _schedule_reference(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    """Warm-up: base·(step+1)/warmup. Then cos² form of the half cosine: base·(r + (1 − r)·cos²(π/2·t)),
    t = (step − warmup)/(total − warmup) clipped to [0, 1]."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
    return base * (min_ratio + (1 - min_ratio) * math.cos(math.pi * t / 2) ** 2)


@pytest.mark.parametrize("total,warmup,min_ratio", [(100, 10, 0.0), (37, 0, 0.1), (20, 5, 0.25)])
def test_lr_schedule_matches_loop(total, warmup, min_ratio):
    got = [learning_rate(step, total, 0.4, warmup, min_ratio) for step in range(total + 3)]
    expected = [_schedule_reference(step, total, 0.4, warmup, min_ratio) for step in range(total + 3)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if warmup:
        assert got[warmup - 1] == pytest.approx(0.4) and got[warmup] == pytest.approx(0.4)  # warm-up meets the peak
    assert got[total] == pytest.approx(0.4 * min_ratio, abs=1e-15)  # ends at min_ratio·base and stays there
    assert all(a >= b for a, b in zip(got[warmup:], got[warmup + 1:]))  # non-increasing after the warm-up
