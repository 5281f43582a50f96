"""cosine-reg / mse-reg baselines against per-sample loops; identity head when widths match."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from distillctl.methods.base import TeacherDims
from distillctl.methods.regression import CosineRegression, MSERegression, RegressionParams
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


def test_mse_reg_matches_loop_and_projection_target() -> None:
    method = MSERegression(RegressionParams(teacher_feature="projection"), STUDENT_DIM, TEACHER_DIMS).double()
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
