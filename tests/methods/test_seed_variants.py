"""seed-smallpatch: main + small-crop SEED terms against loops, separate queues, view layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from distillctl.methods.seed_variants import SeedSmallPatch, SeedSmallPatchParams
from method_harness import STUDENT_DIM, TEACHER_DIMS, TinyNet, TinyTeacher, make_images, make_inputs


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def seed_term(s, t, queue, tau_s, tau_t) -> float:
    """−Σ_j p_T[j] log p_S[j] over [self, queue] for one sample."""
    t_logits = [sum(a * b for a, b in zip(t, t)) / tau_t] + [sum(a * b for a, b in zip(t, q)) / tau_t for q in queue]
    s_logits = [sum(a * b for a, b in zip(s, t)) / tau_s] + [sum(a * b for a, b in zip(s, q)) / tau_s for q in queue]
    t_max, s_max = max(t_logits), max(s_logits)
    t_z = sum(math.exp(v - t_max) for v in t_logits)
    s_lse = s_max + math.log(sum(math.exp(v - s_max) for v in s_logits))
    return -sum(math.exp(tv - t_max) / t_z * (sv - s_lse) for tv, sv in zip(t_logits, s_logits))


def test_smallpatch_loss_matches_loop() -> None:
    params = SeedSmallPatchParams(queue_size=6, small_crops=3, teacher_temperature=0.5, student_temperature=0.2)
    method = SeedSmallPatch(params, STUDENT_DIM, TEACHER_DIMS).double()
    student, teacher = TinyNet(STUDENT_DIM).double(), TinyTeacher().double()
    images = [i.double() for i in make_images(method, 3, 32)]
    assert [img.shape[-1] for img in images] == [32, 14, 14, 14]  # 96/224 of 32 px
    loss, logs = method.loss(make_inputs(method, student, [teacher], images))
    # main_small-patch.py: the small crops go through the student as one batch (train-mode BN over all of them)
    features = [student(images[0])] + list(student(torch.cat(images[1:])).split(3))
    embed_s = [[unit(r) for r in method.head(f).tolist()] for f in features]
    embed_t = [[unit(r) for r in teacher(img)["proj"].tolist()] for img in images]
    queue, small_queue = method.queue.data.tolist(), method.small_queue.data.tolist()
    main = sum(seed_term(s, t, queue, 0.2, 0.5) for s, t in zip(embed_s[0], embed_t[0])) / 3
    small_terms = [seed_term(s, t, small_queue, 0.2, 0.5) for v in range(1, 4) for s, t in zip(embed_s[v], embed_t[v])]
    expected = main + sum(small_terms) / len(small_terms)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)
    assert logs["main"] == pytest.approx(main, rel=1e-9)


def test_queues_take_main_and_first_small_crop() -> None:
    method = SeedSmallPatch(SeedSmallPatchParams(queue_size=8, small_crops=2), STUDENT_DIM, TEACHER_DIMS)
    student, teacher = TinyNet(STUDENT_DIM), TinyTeacher()
    images = make_images(method, 3, 32)
    inputs = make_inputs(method, student, [teacher], images)
    method.after_step(inputs)
    assert torch.allclose(method.queue.data[:3], F.normalize(teacher(images[0])["proj"], dim=1))
    assert torch.allclose(method.small_queue.data[:3], F.normalize(teacher(images[1])["proj"], dim=1))
    req = method.requirements(224)
    assert [v.spec.size for v in req.views] == [224, 96, 96]
    assert req.views[0].spec.scale == (0.14, 1.0) and req.views[1].spec.scale == (0.05, 0.14)


def test_params() -> None:
    with pytest.raises(ValidationError):
        SeedSmallPatchParams(small_crops=0)
    with pytest.raises(ValidationError):
        SeedSmallPatchParams(patches=6)
    assert SeedSmallPatchParams().small_crops == 6 and SeedSmallPatchParams().small_crop_size == 96
