"""simreg-multi: one head per teacher, weighted sum of per-teacher cosine losses against a loop."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from distillctl.errors import UsageError
from distillctl.methods.base import TeacherDims
from distillctl.methods.simreg_variants import SimRegMulti, SimRegMultiParams
from method_harness import STUDENT_DIM, TinyNet, TinyTeacher, make_images, make_inputs

DIMS = [TeacherDims(pooled=12, proj=6), TeacherDims(pooled=10, proj=4)]


def test_multi_teacher_loss_matches_loop() -> None:
    method = SimRegMulti(SimRegMultiParams(teacher_weights=[1.0, 0.25]), STUDENT_DIM, DIMS).double()
    assert method.requirements(16).teacher_outputs == frozenset({"pooled_0", "pooled_1"})
    assert [h[-1].out_features for h in method.heads] == [12, 10]
    student = TinyNet(STUDENT_DIM).double()
    teachers = [TinyTeacher(DIMS[0], seed=1).double(), TinyTeacher(DIMS[1], seed=2).double()]
    images = [i.double() for i in make_images(method, 4, 12)]
    loss, logs = method.loss(make_inputs(method, student, teachers, images))
    expected = 0.0
    for k, weight in enumerate([1.0, 0.25]):
        pred = method.heads[k](student(images[0])).tolist()
        target = teachers[k](images[0])["pooled"].tolist()
        per = [2 - 2 * sum(a * b for a, b in zip(p, t)) / math.sqrt(sum(a * a for a in p) * sum(b * b for b in t))
               for p, t in zip(pred, target)]
        expected += weight * sum(per) / len(per)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)
    assert set(logs) == {"cos_0", "cos_1"}


def test_needs_several_teachers_and_matching_weights() -> None:
    with pytest.raises(UsageError):
        SimRegMulti(SimRegMultiParams(), STUDENT_DIM, DIMS[0])
    with pytest.raises(UsageError):
        SimRegMulti(SimRegMultiParams(teacher_weights=[1.0]), STUDENT_DIM, DIMS)
    with pytest.raises(UsageError):
        SimRegMulti(SimRegMultiParams(teacher_feature="projection"), STUDENT_DIM, [DIMS[0], TeacherDims(pooled=9)])
    with pytest.raises(ValidationError):
        SimRegMultiParams(heads=2)
    proj = SimRegMulti(SimRegMultiParams(teacher_feature="projection"), STUDENT_DIM, DIMS)
    assert proj.requirements(16).teacher_outputs == frozenset({"proj_0", "proj_1"})
