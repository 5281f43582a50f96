"""CompRess 2q / 1q: KL of similarity distributions against loops, queue bookkeeping, cached centre mode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from distillctl.methods.compress import CompRess1q, CompRess2q, CompRess2qParams, CompRessParams
from method_harness import STUDENT_DIM, TEACHER_DIMS, TinyNet, TinyTeacher, make_images, make_inputs


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def loop_kl(teacher, student, teacher_queue, student_queue, tau) -> float:
    total = 0.0
    for t, s in zip(teacher, student):
        p = softmax([sum(a * b for a, b in zip(t, q)) / tau for q in teacher_queue])
        r = softmax([sum(a * b for a, b in zip(s, q)) / tau for q in student_queue])
        total += sum(pi * (math.log(pi) - math.log(ri)) for pi, ri in zip(p, r))
    return total / len(teacher)


def test_2q_loss_matches_loop() -> None:
    method = CompRess2q(CompRess2qParams(queue_size=7, temperature=0.5), STUDENT_DIM, TEACHER_DIMS).double()
    student = TinyNet(STUDENT_DIM).double()
    method.setup(student)
    teacher = TinyTeacher().double()
    images = [i.double() for i in make_images(method, 4, 12)]
    loss, _ = method.loss(make_inputs(method, student, [teacher], images))
    t = [unit(r) for r in teacher(images[0])["pooled"].tolist()]
    s = [unit(r) for r in student(images[0]).tolist()]
    expected = loop_kl(t, s, method.teacher_queue.data.tolist(), method.student_queue.data.tolist(), 0.5)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)


def test_1q_loss_matches_loop_and_uses_teacher_queue_only() -> None:
    method = CompRess1q(CompRessParams(queue_size=5, temperature=0.3), STUDENT_DIM, TEACHER_DIMS).double()
    student, teacher = TinyNet(STUDENT_DIM).double(), TinyTeacher().double()
    images = [i.double() for i in make_images(method, 3, 12)]
    loss, _ = method.loss(make_inputs(method, student, [teacher], images))
    t = [unit(r) for r in teacher(images[0])["pooled"].tolist()]
    s = [unit(r) for r in method.head(student(images[0])).tolist()]
    queue = method.teacher_queue.data.tolist()
    assert float(loss.detach()) == pytest.approx(loop_kl(t, s, queue, queue, 0.3), rel=1e-9)
    assert not hasattr(method, "student_queue") and method.head.out_features == TEACHER_DIMS.pooled


def test_2q_queues_stay_aligned_and_wrap() -> None:
    method = CompRess2q(CompRess2qParams(queue_size=5), STUDENT_DIM, TEACHER_DIMS)
    student, teacher = TinyNet(STUDENT_DIM), TinyTeacher()
    method.setup(student)
    fifo_t, fifo_s = [], []
    for step in range(3):  # 3 batches of 2 into a 5-row queue: the third wraps around
        images = make_images(method, 2, 12, seed=step)
        inputs = make_inputs(method, student, [teacher], images, step=step)
        method.loss(inputs)
        method.after_step(inputs)
        fifo_t += F.normalize(teacher(images[0])["pooled"], dim=1).tolist()
        fifo_s += inputs.extras["compress_keys"].tolist()
    # ring buffer semantics: row r holds the latest entry written at position r
    expected_rows = {r: i for i, r in enumerate([0, 1, 2, 3, 4, 0])}
    for row, i in expected_rows.items():
        assert method.teacher_queue.data[row].tolist() == pytest.approx(fifo_t[i], abs=1e-6)
        assert method.student_queue.data[row].tolist() == pytest.approx(fifo_s[i], abs=1e-6)
    assert int(method.teacher_queue.ptr) == int(method.student_queue.ptr) == 1


def test_centre_mode_views() -> None:
    method = CompRess1q(CompRessParams(queue_size=4, teacher_input="centre"), STUDENT_DIM, TEACHER_DIMS)
    req = method.requirements(32)
    assert [(v.spec.family, v.teacher, v.student) for v in req.views] == [("weak", False, True), ("centre", True, False)]
    assert req.views[0].spec.scale == (0.08, 1.0)
    student, teacher = TinyNet(STUDENT_DIM), TinyTeacher()
    images = make_images(method, 3, 12)
    loss, _ = method.loss(make_inputs(method, student, [teacher], images))
    assert torch.isfinite(loss)


def test_params() -> None:
    assert (CompRess2qParams().queue_size, CompRess2qParams().temperature, CompRess2qParams().momentum) == (128000, 0.04, 0.999)
    with pytest.raises(ValidationError):
        CompRessParams(momentum=0.99)  # 1q has no EMA
