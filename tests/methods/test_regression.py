"""cosine-reg / mse-reg baselines against per-sample loops; identity head when widths match."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from distillctl.methods.base import TeacherDims
from distillctl.methods.regression import (CosineRegression, MSERegression, MSERegressionParams, RegressionParams,
                                           relative_squared_error)
from method_harness import STUDENT_DIM, TEACHER_DIMS, TinyNet, TinyTeacher, make_images, make_inputs


def test_cosine_reg_matches_loop() -> None:
    method = CosineRegression(RegressionParams(), STUDENT_DIM, TEACHER_DIMS).double()
    student, teacher = TinyNet(STUDENT_DIM).double(), TinyTeacher().double()
    images = [i.double() for i in make_images(method, 5, 12)]
    loss, _ = method.loss(make_inputs(method, student, [teacher], images))
    pred = method.head(student(images[0])).tolist()
    target = teacher(images[0])["pooled"].tolist()
    expected = 0.0
    for p, t in zip(pred, target):
        cos = sum(a * b for a, b in zip(p, t)) / math.sqrt(sum(a * a for a in p) * sum(b * b for b in t))
        expected += 2 - 2 * cos
    assert float(loss.detach()) == pytest.approx(expected / 5, rel=1e-9)


def test_mse_reg_relative_matches_loop() -> None:
    method = MSERegression(MSERegressionParams(), STUDENT_DIM, TEACHER_DIMS).double()
    assert method.params.reduction == "relative"
    student, teacher = TinyNet(STUDENT_DIM).double(), TinyTeacher().double()
    images = [i.double() for i in make_images(method, 5, 12)]
    loss, logs = method.loss(make_inputs(method, student, [teacher], images))
    pred = method.head(student(images[0])).tolist()
    target = teacher(images[0])["pooled"].tolist()
    error = sum(sum((a - b) ** 2 for a, b in zip(p, t)) for p, t in zip(pred, target)) / 5
    energy = sum(sum(b * b for b in t) for t in target) / 5
    assert float(loss.detach()) == pytest.approx(error / energy, rel=1e-9)
    assert float(logs["cos"]) == pytest.approx(float(torch.nn.functional.cosine_similarity(
        torch.tensor(pred), torch.tensor(target), dim=1).mean()), rel=1e-5)


def test_mse_reg_relative_is_scale_free_and_gradient_matches_cosine_scale() -> None:
    """The relative loss does not change when teacher and prediction are scaled together; its gradient shrinks
    as 1/scale like cosine-reg's, where the mean reduction's grows with the scale and shrinks with the width."""
    torch.manual_seed(0)
    width, batch = 512, 16
    target = torch.rand(batch, width, dtype=torch.float64) * 0.3  # post-ReLU pooled features
    base = torch.randn(batch, width, dtype=torch.float64) * 0.1

    def grad_norm(loss_fn, scale):
        prediction = (base * scale).requires_grad_(True)
        loss_fn(prediction, target * scale).backward()
        return float(prediction.grad.norm()), float(loss_fn(base * scale, target * scale))

    relative = grad_norm(relative_squared_error, 1.0), grad_norm(relative_squared_error, 10.0)
    assert relative[0][1] == pytest.approx(relative[1][1], rel=1e-12)  # scale-free value
    assert relative[1][0] == pytest.approx(relative[0][0] / 10, rel=1e-9)  # gradient ∝ 1/scale, like a cosine
    mean = grad_norm(torch.nn.functional.mse_loss, 1.0)
    # the old mean reduction's gradient is about 1/D of a per-image error: orders of magnitude below the relative one
    assert mean[0] < relative[0][0] / 10
    # zero prediction explains nothing: loss 1
    assert float(relative_squared_error(torch.zeros_like(target), target)) == pytest.approx(1.0)


def test_mse_reg_mean_reduction_matches_loop_and_projection_target() -> None:
    method = MSERegression(MSERegressionParams(teacher_feature="projection", reduction="mean"), STUDENT_DIM,
                           TEACHER_DIMS).double()
    assert method.requirements(16).teacher_outputs == frozenset({"proj"})
    student, teacher = TinyNet(STUDENT_DIM).double(), TinyTeacher().double()
    images = [i.double() for i in make_images(method, 4, 12)]
    loss, _ = method.loss(make_inputs(method, student, [teacher], images))
    pred = method.head(student(images[0])).tolist()
    target = teacher(images[0])["proj"].tolist()
    expected = sum((a - b) ** 2 for p, t in zip(pred, target) for a, b in zip(p, t)) / (4 * TEACHER_DIMS.proj)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)


def test_identity_head_when_dims_match_no_predictor() -> None:
    same = CosineRegression(RegressionParams(), 12, TeacherDims(pooled=12))
    assert isinstance(same.head, nn.Identity) and same.trainable_parameters() == []
    other = MSERegression(RegressionParams(), 8, TeacherDims(pooled=12))
    assert isinstance(other.head, nn.Linear)  # exactly one linear layer, nothing else
    with pytest.raises(ValidationError):
        RegressionParams(predictor=True)
    with pytest.raises(ValidationError):
        MSERegressionParams(reduction="sum")
