"""BYOL: symmetric predictor/target loss against loops, cosine EMA momentum, target update."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from distillctl.methods.byol import BYOL, BYOLParams
from method_harness import STUDENT_DIM, TinyNet, make_images, make_inputs


def cos(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_byol_loss_matches_loop() -> None:
    method = BYOL(BYOLParams(projector_hidden_dim=16, projection_dim=6, predictor_hidden_dim=16), STUDENT_DIM).double()
    student = TinyNet(STUDENT_DIM).double()
    method.setup(student)
    images = [i.double() for i in make_images(method, 4, 12)]
    loss, _ = method.loss(make_inputs(method, student, None, images))
    p = [method.predictor(method.head(student(img))).tolist() for img in images]
    z = [method.target(img).tolist() for img in images]
    expected = sum(2 - 2 * cos(p[0][b], z[1][b]) for b in range(4)) / 4 + sum(2 - 2 * cos(p[1][b], z[0][b]) for b in range(4)) / 4
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)
    assert [v.spec.family for v in method.requirements(16).views] == ["byol1", "byol2"]


def test_cosine_momentum_and_target_update() -> None:
    method = BYOL(BYOLParams(projector_hidden_dim=16, projection_dim=6, predictor_hidden_dim=16), STUDENT_DIM)
    assert method.momentum(0, 10) == pytest.approx(0.996)
    assert method.momentum(5, 10) == pytest.approx(1 - 0.004 * (math.cos(math.pi * 0.5) + 1) / 2)
    assert method.momentum(10, 10) == pytest.approx(1.0)
    student = TinyNet(STUDENT_DIM)
    method.setup(student)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.5)
    before = [p.clone() for p in method.target.module.backbone.parameters()]
    inputs = make_inputs(method, student, None, make_images(method, 4, 12), epoch=0.0, total_epochs=10)
    method.after_step(inputs)
    for old, new, src in zip(before, method.target.module.backbone.parameters(), student.parameters()):
        assert torch.allclose(new, 0.996 * old + 0.004 * src, atol=1e-6)
    assert all(not p.requires_grad for p in method.target.parameters())
    assert all(p.requires_grad for p in method.trainable_parameters())
    with pytest.raises(ValidationError):
        BYOLParams(tau=0.99)
