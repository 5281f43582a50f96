"""ssl-small: the tuned MoCo v2 configuration (wide head, τ 0.1, ssl-small views) and its InfoNCE by loops."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from distillctl.methods.ssl_small import SslSmall, SslSmallParams
from method_harness import STUDENT_DIM, TinyNet, make_images, make_inputs


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_recipe_defaults() -> None:
    method = SslSmall(SslSmallParams(queue_size=16), STUDENT_DIM)
    assert method.head[0].out_features == 2 * STUDENT_DIM and method.head[-1].out_features == 128
    assert method.params.temperature == 0.1 and method.params.momentum == 0.999 and not method.params.symmetric
    req = method.requirements(32)
    assert req.teacher_mode == "none" and req.teacher_outputs == frozenset()
    assert [v.spec.family for v in req.views] == ["ssl-small", "ssl-small"] and not any(v.teacher for v in req.views)
    assert SslSmallParams().queue_size == 65536
    with pytest.raises(ValidationError):
        SslSmallParams(cj=1)


def test_infonce_matches_loop() -> None:
    method = SslSmall(SslSmallParams(queue_size=5, out_dim=4), STUDENT_DIM).double()
    student = TinyNet(STUDENT_DIM).double()
    method.setup(student)
    images = [i.double() for i in make_images(method, 3, 12)]
    loss, _ = method.loss(make_inputs(method, student, None, images))
    q = [unit(r) for r in method.head(student(images[0])).tolist()]
    k = [unit(r) for r in method.key_encoder(images[1]).tolist()]
    queue = method.queue.data.tolist()
    expected = 0.0
    for qb, kb in zip(q, k):
        logits = [sum(a * b for a, b in zip(qb, kb)) / 0.1] + [sum(a * b for a, b in zip(qb, r)) / 0.1 for r in queue]
        expected += -(logits[0] - math.log(sum(math.exp(v) for v in logits)))
    assert float(loss.detach()) == pytest.approx(expected / 3, rel=1e-9)
