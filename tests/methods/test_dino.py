"""DINO/SSLight: re-weighted multi-crop loss against loops, temperature warm-up, centre EMA, freezing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from distillctl.methods.dino import DINO, DINOParams, dino_loss, teacher_temperature
from method_harness import STUDENT_DIM, TinyNet, make_images, make_inputs

TINY = dict(out_dim=10, hidden_dim=12, bottleneck_dim=5, local_crops=3)


def log_softmax(v):
    top = max(v)
    lse = top + math.log(sum(math.exp(x - top) for x in v))
    return [x - lse for x in v]


def softmax(v):
    return [math.exp(x) for x in log_softmax(v)]


def reference(student, teacher_logits, center, t_temp, s_temp, weights) -> float:
    """student: [view][sample][k] raw head outputs; teacher_logits: [global view][sample][k]."""
    gg, gl = [], []
    for iq, t_view in enumerate(teacher_logits):
        for v, s_view in enumerate(student):
            if v == iq:
                continue
            per_sample = []
            for t, s in zip(t_view, s_view):
                p = softmax([(a - c) / t_temp for a, c in zip(t, center)])
                ls = log_softmax([x / s_temp for x in s])
                per_sample.append(-sum(pi * li for pi, li in zip(p, ls)))
            (gg if v < len(teacher_logits) else gl).append(sum(per_sample) / len(per_sample))
    return weights[0] * sum(gg) / len(gg) + weights[1] * sum(gl) / len(gl)


def test_loss_matches_loop_with_sslight_weights() -> None:
    method = DINO(DINOParams(**TINY), STUDENT_DIM).double()
    student = TinyNet(STUDENT_DIM).double()
    method.setup(student)
    method.center.copy_(torch.randn(1, 10, dtype=torch.float64) * 0.1)
    images = [i.double() for i in make_images(method, 3, 32)]
    assert [img.shape[-1] for img in images] == [32, 32, 18, 18, 18]  # 128/224 of 32 px
    loss, logs = method.loss(make_inputs(method, student, None, images, epoch=4.5, total_epochs=100))
    # published forward: backbone once per resolution, head once on all crops, teacher once on the globals
    features = torch.cat([student(torch.cat(images[:2])), student(torch.cat(images[2:]))])
    student_out = [part.tolist() for part in method.head(features).chunk(5)]
    teacher_out = [part.tolist() for part in method.teacher(torch.cat(images[:2])).chunk(2)]
    t_temp = 0.04 + 0.03 * 4 / 49
    expected = reference(student_out, teacher_out, method.center[0].tolist(), t_temp, 0.1, (0.4, 0.6))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)
    assert logs["teacher_temperature"] == pytest.approx(t_temp)


def test_dino_default_weighting_equals_mean_of_all_terms() -> None:
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(4, 7, generator=g) for _ in range(8)]
    teacher = [F.softmax(torch.randn(4, 7, generator=g), dim=1) for _ in range(2)]
    reweighted, _ = dino_loss(student, teacher, (2 / 14, 12 / 14))
    terms = [torch.sum(-teacher[i] * F.log_softmax(student[v], dim=1), dim=1).mean()
             for i in range(2) for v in range(8) if v != i]
    assert float(reweighted) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-6)


def test_teacher_temperature_schedule_matches_linspace() -> None:
    params = DINOParams()
    schedule = np.concatenate([np.linspace(0.04, 0.07, 50), np.ones(150) * 0.07])
    for epoch in (0, 1, 25, 49, 50, 199):
        assert teacher_temperature(params, epoch) == pytest.approx(schedule[epoch])


def test_center_update_and_prototype_freeze() -> None:
    method = DINO(DINOParams(**TINY), STUDENT_DIM)
    student = TinyNet(STUDENT_DIM)
    method.setup(student)
    images = make_images(method, 4, 32)
    inputs = make_inputs(method, student, None, images, epoch=0.2)
    loss, _ = method.loss(inputs)
    loss.backward()
    assert method.head.prototype_direction.grad is None  # frozen during epoch 0
    assert method.head.mlp[0].weight.grad is not None
    assert not method.head.prototype_scale.requires_grad  # norm_last_layer: g fixed at 1
    teacher_logits = inputs.extras["dino_teacher_logits"]
    method.after_step(inputs)
    assert torch.allclose(method.center, 0.1 * teacher_logits.mean(0, keepdim=True))
    later = make_inputs(method, student, None, images, epoch=1.0)
    method.loss(later)[0].backward()
    assert method.head.prototype_direction.grad is not None


def test_prototype_init_follows_the_official_head() -> None:
    """MLP Linear layers: trunc_normal(0.02), bias 0; prototypes v: nn.Linear's default init (created after the
    MLP init in the official DINOHead), so with the same RNG state v equals a fresh Linear's weight; g = 1."""
    torch.manual_seed(3)
    method = DINO(DINOParams(**TINY), STUDENT_DIM)
    torch.manual_seed(3)
    reference_layers = [torch.nn.Linear(STUDENT_DIM, 12), torch.nn.Linear(12, 12), torch.nn.Linear(12, 5)]
    for layer in reference_layers:
        torch.nn.init.trunc_normal_(layer.weight, std=0.02)
    prototypes = torch.nn.Linear(5, 10, bias=False)
    linears = [m for m in method.head.mlp if isinstance(m, torch.nn.Linear)]
    for got, want in zip(linears, reference_layers):
        assert got.weight.equal(want.weight) and not got.bias.any()
    assert method.head.prototype_direction.equal(prototypes.weight)
    assert float(method.head.prototype_direction.detach().abs().max()) <= 1 / math.sqrt(5)
    assert method.head.prototype_scale.eq(1).all()


def test_views_grouped_by_resolution() -> None:
    requirements = DINO(DINOParams(**TINY), STUDENT_DIM).requirements(32)
    assert requirements.grouping == "by_resolution"
    assert requirements.forward_groups(list(range(5))) == [[0, 1], [2, 3, 4]]


def test_params() -> None:
    p = DINOParams()
    assert (p.out_dim, p.local_crops, p.local_crop_size, p.global_crop_scale, p.loss_weights) == (4096, 6, 128, (0.3, 1.0), (0.4, 0.6))
    assert (p.warmup_teacher_temperature, p.teacher_temperature, p.warmup_teacher_temperature_epochs) == (0.04, 0.07, 50)
    with pytest.raises(ValidationError):
        DINOParams(lambdas=(0.4, 0.6))
