"""OSS: the teacher's NT-Xent and the student's regression against loop-based computations (batch of 2, identical
views), the teacher detached in the distillation term, the λ ramp, and training + bit-exact resume (teacher
included) through the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from distillctl.methods.base import MethodInputs, TeacherDims
from distillctl.methods.oss import OSS, OSSParams, distill_weight
from method_harness import STUDENT_DIM, TinyNet
from test_dogo import ntxent_loop


def regression_loop(prediction: list[list[float]], target: list[list[float]]) -> float:
    total = 0.0
    for p, t in zip(prediction, target):
        cos = sum(a * b for a, b in zip(p, t)) / (math.sqrt(sum(a * a for a in p)) * math.sqrt(sum(b * b for b in t)))
        total += 2 - 2 * cos
    return total / len(prediction)


def _setup(batch: int, identical: bool, **params):
    torch.manual_seed(batch)
    teacher = TinyNet(12, seed=5).double()
    method = OSS(OSSParams(teacher_hidden_dim=16, projection_dim=6, predictor_hidden_dim=16, **params), STUDENT_DIM,
                 TeacherDims(12, backbone=teacher)).double()
    student = TinyNet(STUDENT_DIM).double()
    first = torch.randn(batch, 3, 16, 16, dtype=torch.float64)
    images = [first, first.clone() if identical else torch.randn(batch, 3, 16, 16, dtype=torch.float64)]
    return method, student, teacher, images


def _inputs(student, teacher, images, epoch: float = 0.0) -> MethodInputs:
    return MethodInputs(student_features=[student(img) for img in images],
                        teacher_outputs=[{"pooled": teacher(img)} for img in images], images=images,
                        index=torch.arange(images[0].shape[0]), epoch=epoch, step=0, total_epochs=4, student=student,
                        teacher=type("T", (), {"backbone": teacher})())


@pytest.mark.parametrize("batch,identical", [(2, False), (2, True), (5, False)])
def test_loss_matches_loops(batch: int, identical: bool) -> None:
    method, student, teacher, images = _setup(batch, identical, distill_weight=0.7)
    loss, logs = method.loss(_inputs(student, teacher, images))
    with torch.no_grad():
        z = [method.teacher_head(teacher(img)).tolist() for img in images]
        p = [method.predictor(student(img)).tolist() for img in images]
    ssl = ntxent_loop(z[0], z[1], 0.2)
    distil = regression_loop(p[0], z[0]) + regression_loop(p[1], z[1])
    assert logs["ssl_t"] == pytest.approx(ssl, rel=1e-10) and logs["distil"] == pytest.approx(distil, rel=1e-10)
    assert float(loss.detach()) == pytest.approx(ssl + 0.7 * distil, rel=1e-10)


def test_teacher_learns_by_ssl_only() -> None:
    method, student, teacher, images = _setup(4, False)
    inputs = _inputs(student, teacher, images)
    teacher_out = [out["pooled"] for out in inputs.teacher_outputs]
    distil_only = sum(torch.nn.functional.cosine_similarity(method.predictor(f), method.teacher_head(t).detach()).sum()
                      for f, t in zip(inputs.student_features, teacher_out))
    grads = torch.autograd.grad(distil_only, list(teacher.parameters()) + list(method.teacher_head.parameters()),
                                allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0 for g in grads)  # the teacher is detached in distillation
    loss, _ = method.loss(_inputs(student, teacher, images))
    loss.backward()
    assert teacher.body[0].weight.grad.abs().sum() > 0 and student.body[0].weight.grad.abs().sum() > 0


def test_weight_ramp_requirements_and_params() -> None:
    assert distill_weight(2.0, 0.0, 0.0) == 2.0
    assert distill_weight(2.0, 4.0, 1.0) == pytest.approx(0.5) and distill_weight(2.0, 4.0, 9.0) == 2.0
    method, student, teacher, images = _setup(3, False, distill_warmup_epochs=2.0)
    _, logs = method.loss(_inputs(student, teacher, images, epoch=0.5))
    assert logs["distill_weight"] == pytest.approx(0.25)
    req = method.requirements(32)
    assert req.teacher_mode == "co_trained" and req.teacher_bn == "train"
    assert len(req.views) == 2 and all(v.teacher and v.student for v in req.views)
    params = OSSParams()
    assert (params.temperature, params.projection_dim, params.distill_weight) == (0.2, 128, 1.0)
    for bad in ({"temperature": 0}, {"distill_weight": -1}, {"distill_warmup_epochs": -1}, {"lam": 1}):
        with pytest.raises(ValidationError):
            OSSParams(**bad)


@pytest.mark.slow
def test_trains_and_resumes_exactly(tmp_path) -> None:
    from cotrained_e2e import train_and_resume

    rows = train_and_resume(tmp_path, "oss", ["--set", "method.params.teacher_hidden_dim=32",
                                              "--set", "method.params.predictor_hidden_dim=32"])
    assert all(math.isfinite(row["ssl_t"]) and math.isfinite(row["distil"]) for row in rows)
