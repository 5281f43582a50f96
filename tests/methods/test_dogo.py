"""DoGo: NT-Xent and the mutual similarity KL against loop-based computations (batch of 2, identical views), the
peer detached in each KL, the view layout, and training + bit-exact resume (teacher included) through the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from distillctl.methods.base import TeacherDims
from distillctl.methods.dogo import DoGo, DoGoParams, dogo_losses
from method_harness import STUDENT_DIM, TinyNet, TinyTeacher, make_images, make_inputs


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def ntxent_loop(zx: list[list[float]], zy: list[list[float]], tau: float) -> float:
    """SimCLR's NT-Xent written out: 2B anchors, each against its pair and the 2B-2 others."""
    z = zx + zy
    n, b = len(z), len(zx)
    total = 0.0
    for i in range(n):
        pair = (i + b) % n
        denominator = sum(math.exp(_cos(z[i], z[k]) / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(_cos(z[i], z[pair]) / tau) / denominator)
    return total / n


def probs_loop(zx: list[list[float]], zy: list[list[float]], tau: float) -> list[list[float]]:
    rows = []
    for a in zx:
        logits = [math.exp(_cos(a, c) / tau) for c in zy]
        rows.append([v / sum(logits) for v in logits])
    return rows


def kl_loop(own: list[list[float]], peer: list[list[float]]) -> float:
    """Σ_ij P_peer·log(P_peer / P_own) / B² (kl_div's "mean" over all entries)."""
    b = len(own)
    return sum(peer[i][j] * math.log(peer[i][j] / own[i][j]) for i in range(b) for j in range(b)) / (b * b)


@pytest.mark.parametrize("batch,dim,identical", [(2, 3, False), (2, 5, True), (4, 6, False), (7, 4, True)])
def test_losses_match_loops(batch: int, dim: int, identical: bool) -> None:
    generator = torch.Generator().manual_seed(batch * 13 + dim)
    zs = [torch.randn(batch, dim, dtype=torch.float64, generator=generator) for _ in range(4)]
    if identical:  # both views the same tensor: positives at cosine 1, P peaked on the diagonal
        zs[1], zs[3] = zs[0].clone(), zs[2].clone()
    terms = dogo_losses((zs[0], zs[1]), (zs[2], zs[3]), 0.5, 0.1)
    s, t = [[z.tolist() for z in pair] for pair in ((zs[0], zs[1]), (zs[2], zs[3]))]
    p_s, p_t = probs_loop(*s, 0.1), probs_loop(*t, 0.1)
    assert float(terms["ssl_s"]) == pytest.approx(ntxent_loop(*s, 0.5), rel=1e-12)
    assert float(terms["ssl_t"]) == pytest.approx(ntxent_loop(*t, 0.5), rel=1e-12)
    assert float(terms["kl_s"]) == pytest.approx(kl_loop(p_s, p_t), rel=1e-10, abs=1e-15)
    assert float(terms["kl_t"]) == pytest.approx(kl_loop(p_t, p_s), rel=1e-10, abs=1e-15)


def test_kl_is_zero_for_equal_similarities_and_the_peer_is_detached() -> None:
    z = torch.randn(3, 4, dtype=torch.float64)
    same = dogo_losses((z, z.flip(0)), (2 * z, 2 * z.flip(0)), 0.5, 0.1)  # cosines are scale-free
    assert float(same["kl_s"]) == pytest.approx(0.0, abs=1e-14) and float(same["kl_t"]) == pytest.approx(0.0, abs=1e-14)
    zs = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    terms = dogo_losses((zs[0], zs[1]), (zs[2], zs[3]), 0.5, 0.1)
    grads = torch.autograd.grad(terms["kl_s"], zs, allow_unused=True)
    assert grads[0].abs().sum() > 0 and all(g is None or float(g.abs().sum()) == 0 for g in grads[2:])
    grads = torch.autograd.grad(terms["kl_t"], zs, allow_unused=True)
    assert grads[2].abs().sum() > 0 and all(g is None or float(g.abs().sum()) == 0 for g in grads[:2])


def test_method_loss_combines_both_networks() -> None:
    dims = TeacherDims(pooled=12)
    method = DoGo(DoGoParams(hidden_dim=16, projection_dim=6, student_kl_weight=3.0, teacher_kl_weight=0.5),
                  STUDENT_DIM, dims).double()
    student, teacher = TinyNet(STUDENT_DIM).double(), TinyTeacher(dims).double()
    images = [i.double() for i in make_images(method, 4, 16)]
    inputs = make_inputs(method, student, [teacher], images)
    assert [out is None for out in inputs.teacher_outputs] == [True, True, False, False]  # own views per network
    loss, logs = method.loss(inputs)
    logs = {key: float(value) for key, value in logs.items()}
    assert float(loss.detach()) == pytest.approx(logs["ssl_s"] + 3.0 * logs["kl_s"] + logs["ssl_t"] + 0.5 * logs["kl_t"],
                                        rel=1e-12)
    loss.backward()
    assert method.student_head[0].weight.grad.abs().sum() > 0 and method.teacher_head[0].weight.grad.abs().sum() > 0


def test_requirements_and_params() -> None:
    req = DoGo(DoGoParams(), STUDENT_DIM, TeacherDims(12)).requirements(32)
    assert req.teacher_mode == "co_trained" and req.teacher_bn == "train" and len(req.views) == 4
    assert [v.student for v in req.views] == [True, True, False, False]
    shared = DoGo(DoGoParams(shared_views=True), STUDENT_DIM, TeacherDims(12)).requirements(32)
    assert len(shared.views) == 2 and all(v.student and v.teacher for v in shared.views)
    params = DoGoParams()
    assert (params.temperature, params.kl_temperature, params.student_kl_weight, params.projection_dim) == (0.5, 0.1,
                                                                                                          100.0, 128)
    for bad in ({"temperature": 0}, {"student_kl_weight": -1}, {"hidden_dim": 0}, {"lambda": 1}):
        with pytest.raises(ValidationError):
            DoGoParams(**bad)


@pytest.mark.slow
def test_trains_and_resumes_exactly(tmp_path) -> None:
    from cotrained_e2e import train_and_resume

    rows = train_and_resume(tmp_path, "dogo", ["--set", "method.params.hidden_dim=32"])
    assert all(row["kl_s"] >= 0 and row["kl_t"] >= 0 for row in rows)
