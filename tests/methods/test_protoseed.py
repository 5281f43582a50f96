"""ProtoSEED: the SEED-over-prototypes loss against a loop (batch of 2 included), the online k-means prototype update
against a loop (a prototype with one member, one with several, one with none), and training + bit-exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from distillctl.methods.protoseed import ProtoSEED, ProtoSEEDParams, kmeans_update
from method_harness import STUDENT_DIM, TEACHER_DIMS, TinyNet, TinyTeacher, make_images, make_inputs


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def protoseed_loop(students, teachers, prototypes, tau_s: float, tau_t: float) -> float:
    """mean over samples of −Σ_j p_T[j]·log p_S[j] over [self, prototypes]."""
    total = 0.0
    for s, t in zip(students, teachers):
        s, t = unit(s), unit(t)
        t_logits = [dot(t, t) / tau_t] + [dot(t, c) / tau_t for c in prototypes]
        s_logits = [dot(s, t) / tau_s] + [dot(s, c) / tau_s for c in prototypes]
        t_max, s_max = max(t_logits), max(s_logits)
        t_z = sum(math.exp(v - t_max) for v in t_logits)
        s_lse = s_max + math.log(sum(math.exp(v - s_max) for v in s_logits))
        total += -sum(math.exp(tv - t_max) / t_z * (sv - s_lse) for tv, sv in zip(t_logits, s_logits))
    return total / len(students)


def kmeans_loop(prototypes, embeddings, momentum: float):
    members: dict[int, list] = {}
    for e in embeddings:
        best = max(range(len(prototypes)), key=lambda k: dot(e, prototypes[k]))
        members.setdefault(best, []).append(e)
    out = [list(p) for p in prototypes]
    for k, group in members.items():
        mean = [sum(col) / len(group) for col in zip(*group)]
        out[k] = unit([momentum * a + (1 - momentum) * b for a, b in zip(prototypes[k], mean)])
    return out, {k: len(g) for k, g in members.items()}


@pytest.mark.parametrize("batch", [2, 4])
def test_loss_matches_loop(batch: int) -> None:
    params = ProtoSEEDParams(num_prototypes=5, teacher_temperature=0.3, student_temperature=0.2)
    method = ProtoSEED(params, STUDENT_DIM, TEACHER_DIMS).double()
    student, teacher = TinyNet(STUDENT_DIM).double(), TinyTeacher().double()
    images = [i.double() for i in make_images(method, batch, 16)]
    for step in range(2):  # before and after a prototype update
        inputs = make_inputs(method, student, [teacher], images, step=step)
        loss, _ = method.loss(inputs)
        expected = protoseed_loop(method.head(student(images[0])).tolist(), teacher(images[0])["proj"].tolist(),
                                  method.prototypes.tolist(), 0.2, 0.3)
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-10)
        loss.backward()
        assert not method.prototypes.requires_grad  # prototypes learn by k-means only
        method.after_step(inputs)


def test_kmeans_update_one_member_several_members_and_none() -> None:
    prototypes = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    embeddings = F.normalize(torch.tensor([[0.9, 0.1, 0.0], [0.8, -0.2, 0.1], [0.1, 0.95, 0.0]], dtype=torch.float64), dim=1)
    expected, members = kmeans_loop(prototypes.tolist(), embeddings.tolist(), 0.9)
    assert members == {0: 2, 1: 1}  # prototype 1 has exactly one member, prototype 2 none
    counts = kmeans_update(prototypes, embeddings, 0.9)
    assert counts.tolist() == [2, 1, 0]
    assert torch.allclose(prototypes, torch.tensor(expected, dtype=torch.float64), atol=1e-15)
    assert torch.equal(prototypes[2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))  # untouched
    one = unit([0.9 * a + 0.1 * b for a, b in zip([0.0, 1.0, 0.0], embeddings[2].tolist())])
    assert prototypes[1].tolist() == pytest.approx(one, abs=1e-15)


def test_kmeans_on_random_batch_matches_loop() -> None:
    generator = torch.Generator().manual_seed(3)
    prototypes = F.normalize(torch.randn(6, 4, dtype=torch.float64, generator=generator), dim=1)
    embeddings = F.normalize(torch.randn(10, 4, dtype=torch.float64, generator=generator), dim=1)
    expected, members = kmeans_loop(prototypes.tolist(), embeddings.tolist(), 0.5)
    counts = kmeans_update(prototypes, embeddings, 0.5)
    assert {k: int(v) for k, v in enumerate(counts) if v} == members
    assert torch.allclose(prototypes, torch.tensor(expected, dtype=torch.float64), atol=1e-14)


def test_after_step_updates_prototypes_from_teacher_embeddings() -> None:
    method = ProtoSEED(ProtoSEEDParams(num_prototypes=3), STUDENT_DIM, TEACHER_DIMS).double()
    student, teacher = TinyNet(STUDENT_DIM).double(), TinyTeacher().double()
    images = [i.double() for i in make_images(method, 2, 16)]
    before = method.prototypes.clone()
    inputs = make_inputs(method, student, [teacher], images)
    method.after_step(inputs)
    expected, _ = kmeans_loop(before.tolist(), F.normalize(teacher(images[0])["proj"], dim=1).tolist(), 0.9)
    assert torch.allclose(method.prototypes, torch.tensor(expected, dtype=torch.float64), atol=1e-14)


def test_params_defaults_and_domains() -> None:
    params = ProtoSEEDParams()
    assert (params.num_prototypes, params.prototype_momentum, params.student_temperature,
            params.teacher_temperature) == (3000, 0.9, 0.2, 0.04)
    for bad in ({"num_prototypes": 0}, {"prototype_momentum": 1.0}, {"student_temperature": 0}, {"queue_size": 8}):
        with pytest.raises(ValidationError):
            ProtoSEEDParams(**bad)
    assert ProtoSEED(params, STUDENT_DIM, TEACHER_DIMS).requirements(32).teacher_mode == "cached_exact"


def test_recipes_validate() -> None:
    from pooled_e2e import check_recipes

    check_recipes("protoseed")


@pytest.mark.slow
def test_trains_and_resumes_exactly(tmp_path, tiny_teacher_file) -> None:
    from pooled_e2e import train_and_resume

    train_and_resume(tmp_path, tiny_teacher_file, "protoseed", ["--set", "method.params.num_prototypes=40"])
