"""ProtoCPC: the loss against a loop over its formula (uniform prior at the start, an EMA prior later, batch of 2),
the prior's EMA, the prototypes' gradient (student side only), and training + bit-exact resume through the CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from distillctl.methods.protocpc import ProtoCPC, ProtoCPCParams, protocpc_loss, prototype_weight
from method_harness import STUDENT_DIM, TEACHER_DIMS, TinyNet, TinyTeacher, make_images, make_inputs


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def protocpc_loop(student_emb, teacher_emb, prototypes, prior, tau_s: float, tau_t: float) -> float:
    """Per sample: −Σ_k P_T[k]·z[k] + log Σ_k π[k]·exp(z[k]) with cosine logits, averaged over the batch."""
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    protos = [unit(p) for p in prototypes]
    total = 0.0
    for s, t in zip(student_emb, teacher_emb):
        s, t = unit(s), unit(t)
        z = [sum(a * b for a, b in zip(s, p)) / tau_s for p in protos]
        probs = softmax([sum(a * b for a, b in zip(t, p)) / tau_t for p in protos])
        total += -sum(pk * zk for pk, zk in zip(probs, z)) + math.log(sum(pi * math.exp(zk) for pi, zk in zip(prior, z)))
    return total / len(student_emb)


def build(batch: int = 2, k: int = 5):
    params = ProtoCPCParams(out_dim=k, hidden_dim=7, teacher_temperature=0.5, student_temperature=0.3)
    method = ProtoCPC(params, STUDENT_DIM, TEACHER_DIMS).double()
    student, teacher = TinyNet(STUDENT_DIM).double(), TinyTeacher().double()
    images = [i.double() for i in make_images(method, batch, 16)]
    return method, student, teacher, images


def loop_for(method, student, teacher, images) -> float:
    s = method.head.mlp(student(images[0])).tolist()
    t = teacher(images[0])["proj"].tolist()
    protos = prototype_weight(method.head).tolist()
    prior = method.prior.tolist()
    return protocpc_loop(s, t, protos, prior, method.params.student_temperature, method.params.teacher_temperature)


@pytest.mark.parametrize("batch", [2, 5])
def test_loss_matches_loop_from_uniform_prior_and_after_prior_updates(batch: int) -> None:
    method, student, teacher, images = build(batch)
    assert torch.equal(method.prior, torch.ones(5, dtype=torch.float64))  # π starts uniform at mean 1
    for step in range(3):
        inputs = make_inputs(method, student, [teacher], images, step=step)
        loss, _ = method.loss(inputs)
        assert float(loss.detach()) == pytest.approx(loop_for(method, student, teacher, images), rel=1e-10)
        method.after_step(inputs)
    assert not torch.allclose(method.prior, torch.ones(5, dtype=torch.float64))  # the prior has moved


def test_uniform_prior_gives_the_kd_cross_entropy() -> None:
    logits = torch.randn(3, 6, dtype=torch.float64)
    probs = F.softmax(torch.randn(3, 6, dtype=torch.float64), dim=1)
    uniform = torch.ones(6, dtype=torch.float64)
    cross_entropy = -(probs * F.log_softmax(logits, dim=1)).sum(1).mean()
    assert float(protocpc_loss(logits, probs, uniform)) == pytest.approx(float(cross_entropy), rel=1e-12)
    # a prior concentrated on one prototype: the partition is that prototype's logit + log(K)
    spike = torch.zeros(6, dtype=torch.float64)
    spike[2] = 6.0
    expected = (-(probs * logits).sum(1) + logits[:, 2] + math.log(6)).mean()
    assert float(protocpc_loss(logits, probs, spike)) == pytest.approx(float(expected), rel=1e-12)


def test_prior_is_an_ema_of_batch_mean_teacher_probabilities() -> None:
    method, student, teacher, images = build(batch=2, k=4)
    inputs = make_inputs(method, student, [teacher], images)
    method.loss(inputs)
    with torch.no_grad():
        t = F.normalize(teacher(images[0])["proj"], dim=1)
        probs = F.softmax(t @ prototype_weight(method.head).t() / 0.5, dim=1)
    method.after_step(inputs)
    expected = 0.9 * torch.full((4,), 0.25, dtype=torch.float64) + 0.1 * probs.mean(0)  # EMA of the batch means
    assert torch.allclose(method.prior, 4 * expected, atol=1e-14)  # ... rescaled to mean 1
    assert float(method.prior.mean()) == pytest.approx(1.0, rel=1e-12)


def test_prototypes_get_gradient_from_the_student_side_only() -> None:
    method, student, teacher, images = build(batch=3)
    loss, _ = method.loss(make_inputs(method, student, [teacher], images))
    loss.backward()
    full = method.head.prototype_direction.grad.clone()
    method.zero_grad()
    # the same loss with the teacher distribution as a constant: identical prototype gradient
    with torch.no_grad():
        probs = method.teacher_probs(teacher(images[0])["proj"])
    logits = method.head(student(images[0])) / method.params.student_temperature
    protocpc_loss(logits, probs, method.prior).backward()
    assert torch.allclose(method.head.prototype_direction.grad, full, atol=1e-14)
    assert full.abs().sum() > 0


def test_params_defaults_and_domains() -> None:
    params = ProtoCPCParams()
    assert (params.out_dim, params.teacher_temperature, params.student_temperature, params.prior_momentum) == (65536, 0.04, 0.1, 0.9)
    for bad in ({"prior_momentum": 1.0}, {"out_dim": 1}, {"teacher_temperature": 0}, {"prior": 0.9}):
        with pytest.raises(ValidationError):
            ProtoCPCParams(**bad)
    assert ProtoCPC(params, STUDENT_DIM, TEACHER_DIMS).requirements(32).teacher_mode == "cached_exact"


def test_recipes_validate() -> None:
    from pooled_e2e import check_recipes

    check_recipes("protocpc")


@pytest.mark.slow
def test_trains_and_resumes_exactly(tmp_path, tiny_teacher_file) -> None:
    from pooled_e2e import train_and_resume

    train_and_resume(tmp_path, tiny_teacher_file, "protocpc",
                     ["--set", "method.params.out_dim=64", "--set", "method.params.hidden_dim=32"])
