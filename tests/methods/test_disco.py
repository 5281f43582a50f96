"""DisCo: InfoNCE + summed squared error against per-sample loops; queue/EMA updates; only_mse."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from distillctl.methods.disco import DisCo, DisCoParams
from method_harness import STUDENT_DIM, TEACHER_DIMS, TinyNet, TinyTeacher, make_images, make_inputs


def loop_info_nce(q: list[float], k: list[float], queue: list[list[float]], tau: float) -> float:
    logits = [sum(a * b for a, b in zip(q, k)) / tau] + [sum(a * b for a, b in zip(q, row)) / tau for row in queue]
    top = max(logits)
    return -(logits[0] - top - math.log(sum(math.exp(v - top) for v in logits)))


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_disco_loss_matches_loop() -> None:
    params = DisCoParams(queue_size=10, hidden_dim=16, temperature=0.2, mse_reduction="sum")
    method = DisCo(params, STUDENT_DIM, TEACHER_DIMS).double()
    student = TinyNet(STUDENT_DIM).double()
    method.setup(student)
    teacher = TinyTeacher().double()
    images = [img.double() for img in make_images(method, 5, 12)]
    inputs = make_inputs(method, student, [teacher], images)
    loss, logs = method.loss(inputs)

    with torch.no_grad():
        q = [unit(row) for row in method.head(student(images[0])).tolist()]
        q2 = [unit(row) for row in method.head(student(images[1])).tolist()]
        t1 = [unit(row) for row in teacher(images[0])["proj"].tolist()]
        t2 = [unit(row) for row in teacher(images[1])["proj"].tolist()]
        k = [unit(row) for row in method.key_encoder(images[1]).tolist()]
    queue = method.queue.data.tolist()
    moco = sum(loop_info_nce(q[b], k[b], queue, 0.2) for b in range(5)) / 5
    squared = sum((a - c) ** 2 for b in range(5) for a, c in zip(q[b], t1[b]))
    squared += sum((a - c) ** 2 for b in range(5) for a, c in zip(q2[b], t2[b]))
    assert float(loss.detach()) == pytest.approx(moco + squared, rel=1e-9)
    assert logs["mse"] == pytest.approx(squared, rel=1e-9)
    # Σ(q−t)² over unit vectors is 2·Σ(1−cos)
    cos_sum = sum(sum(a * c for a, c in zip(q[b], t1[b])) + sum(a * c for a, c in zip(q2[b], t2[b])) for b in range(5))
    assert squared == pytest.approx(2 * (10 - cos_sum), rel=1e-9)


def test_after_step_enqueues_keys_and_moves_key_encoder() -> None:
    method = DisCo(DisCoParams(queue_size=7, hidden_dim=16, momentum=0.5), STUDENT_DIM, TEACHER_DIMS)
    student = TinyNet(STUDENT_DIM)
    method.setup(student)
    images = make_images(method, 4, 12)
    inputs = make_inputs(method, student, [TinyTeacher()], images)
    method.loss(inputs)
    keys = inputs.extras["disco_keys"].clone()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.key_encoder.parameters()]
    method.after_step(inputs)
    assert torch.equal(method.queue.data[:4], keys) and int(method.queue.ptr) == 4
    for old, new, src in zip(before, method.key_encoder.module.backbone.parameters(), student.parameters()):
        assert torch.allclose(new, 0.5 * old + 0.5 * src)
    method.loss(inputs)
    method.after_step(inputs)  # 4 more rows into a 7-row queue: wraps around
    assert int(method.queue.ptr) == 1 and torch.equal(method.queue.data[0], inputs.extras["disco_keys"][3])


def test_only_mse_and_mean_reduction() -> None:
    method = DisCo(DisCoParams(only_mse=True, mse_reduction="mean", hidden_dim=16), STUDENT_DIM, TEACHER_DIMS)
    student = TinyNet(STUDENT_DIM)
    method.setup(student)
    assert method.key_encoder is None and method.queue is None
    images = make_images(method, 4, 12)
    inputs = make_inputs(method, student, [TinyTeacher()], images)
    loss, logs = method.loss(inputs)
    q = [F.normalize(method.head(student(img)), dim=1) for img in images]
    t = [F.normalize(TinyTeacher()(img)["proj"], dim=1) for img in images]
    expected = sum(((a - b) ** 2).sum(1).mean() for a, b in zip(q, t))
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    method.after_step(inputs)  # nothing to update, must not fail


def test_published_reduction_is_32_times_the_batch_mean() -> None:
    from distillctl.methods.disco import embedding_squared_error

    q, t = torch.randn(5, 3), torch.randn(5, 3)
    per_sample = [sum((float(a) - float(b)) ** 2 for a, b in zip(q[i], t[i])) for i in range(5)]
    assert float(embedding_squared_error(q, t, "published")) == pytest.approx(32 * sum(per_sample) / 5, rel=1e-5)
    assert float(embedding_squared_error(q, t, "sum")) == pytest.approx(sum(per_sample), rel=1e-5)
    assert DisCoParams().mse_reduction == "published"


def test_defaults_and_params() -> None:
    params = DisCoParams()
    assert (params.queue_size, params.temperature, params.momentum, params.hidden_dim) == (65536, 0.2, 0.999, 2048)
    assert params.teacher_bn == "train"
    req = DisCo(DisCoParams(queue_size=8), STUDENT_DIM, TEACHER_DIMS).requirements(16)
    assert req.teacher_bn == "train" and req.teacher_mode == "cached_approx" and len(req.views) == 2
    assert DisCo(DisCoParams(queue_size=8, teacher_bn="eval"), STUDENT_DIM, TEACHER_DIMS).requirements(16).teacher_mode == "cached_exact"
    with pytest.raises(ValidationError):
        DisCoParams(only_mse_loss=True)


def test_shuffle_bn_switch_is_identity_on_one_process() -> None:
    losses = []
    for shuffle in (True, False):
        torch.manual_seed(0)
        method = DisCo(DisCoParams(queue_size=8, hidden_dim=16, shuffle_bn=shuffle), STUDENT_DIM, TEACHER_DIMS)
        student = TinyNet(STUDENT_DIM)
        method.setup(student)
        torch.manual_seed(0)
        method.queue.data.copy_(F.normalize(torch.randn(8, TEACHER_DIMS.proj), dim=1))
        images = make_images(method, 4, 12)
        losses.append(float(method.loss(make_inputs(method, student, [TinyTeacher()], images))[0].detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
