"""MoCo v2's InfoNCE and SimCLR's NT-Xent against independent per-sample loops (float64, tiny tensors), and
the MoCo v2 method's symmetric loss built from those terms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillctl.methods.common import info_nce
from distillctl.methods.mocov2 import MocoV2, MocoV2Params
from distillctl.methods.simclr import nt_xent
from method_harness import STUDENT_DIM, TinyNet, make_images, make_inputs


def _unit(rows: torch.Tensor) -> list[list[float]]:
    return [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in rows.tolist()]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _infonce_loop(query, key, queue, tau: float) -> float:
    """mean_i −log( exp(q_i·k_i/τ) / (exp(q_i·k_i/τ) + Σ_j exp(q_i·Q_j/τ)) ), inputs already unit vectors."""
    total = 0.0
    for q, k in zip(query, key):
        logits = [_dot(q, k) / tau] + [_dot(q, n) / tau for n in queue]
        top = max(logits)
        total += -(logits[0] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(query)


def _ntxent_loop(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """Over the 2B unit vectors: view a's positive is its pair, its negatives every other view but itself."""
    z = _unit(torch.cat([z1, z2]))
    batch, total = z1.shape[0], 0.0
    for a in range(2 * batch):
        positive = (a + batch) % (2 * batch)
        others = [_dot(z[a], z[k]) / tau for k in range(2 * batch) if k != a]
        top = max(others)
        total += -(_dot(z[a], z[positive]) / tau - top - math.log(sum(math.exp(v - top) for v in others)))
    return total / (2 * batch)


@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
def test_infonce_matches_loop(tau):
    generator = torch.Generator().manual_seed(0)
    query, key, queue = (F.normalize(torch.randn(n, 5, generator=generator, dtype=torch.float64), dim=1)
                         for n in (4, 4, 9))
    expected = _infonce_loop(query.tolist(), key.tolist(), queue.tolist(), tau)
    assert float(info_nce(query, key, queue, tau)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ntxent_matches_loop(tau):
    generator = torch.Generator().manual_seed(1)
    z1, z2 = (3.0 * torch.randn(5, 6, generator=generator, dtype=torch.float64) for _ in range(2))  # unnormalised
    assert float(nt_xent(z1, z2, tau)) == pytest.approx(_ntxent_loop(z1, z2, tau), rel=1e-12)


def _moco_step(**params):
    """(method, inputs, loss, unit queries, unit keys) of one float64 MoCo v2 loss on 6 images of 16 px."""
    torch.manual_seed(0)
    method = MocoV2(MocoV2Params(queue_size=12, out_dim=4, temperature=0.2, **params), STUDENT_DIM).double()
    student = TinyNet(STUDENT_DIM).double()
    method.setup(student)
    images = [image.double() for image in make_images(method, 6, 16)]
    inputs = make_inputs(method, student, None, images)
    loss, _ = method.loss(inputs)
    with torch.no_grad():
        queries = [_unit(method.head(f)) for f in inputs.student_features]
        keys = [_unit(method.key_encoder(image)) for image in images]
    return method, inputs, loss, queries, keys


def test_mocov2_symmetric_loss_is_the_mean_of_both_directions():
    method, _, loss, queries, keys = _moco_step()
    queue = method.queue.data.tolist()  # rows as stored (unit up to float32 rounding), used as they are
    expected = (_infonce_loop(queries[0], keys[1], queue, 0.2) + _infonce_loop(queries[1], keys[0], queue, 0.2)) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["mocov2", "rekd", "ssl-small"])
def test_head_bn_puts_batchnorm_after_the_hidden_layer_of_every_moco_head(name):
    """MoCo v2's head is Linear–ReLU–Linear; head_bn=true makes it Linear–BN–ReLU–Linear (SimCLR / MoCo v3 heads)
    for mocov2 and the methods built on it, and the EMA key encoder copies that head."""
    from torch import nn

    from distillctl.methods.base import TeacherDims, get_method

    cls = get_method(name)
    teacher_dims = TeacherDims(pooled=12) if name == "rekd" else None
    plain = cls(cls.Params(), STUDENT_DIM, teacher_dims)
    assert [type(m) for m in plain.head] == [nn.Linear, nn.ReLU, nn.Linear]
    with_bn = cls(cls.Params(head_bn=True), STUDENT_DIM, teacher_dims)
    assert [type(m) for m in with_bn.head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert with_bn.head[1].num_features == with_bn.head[0].out_features
    if name != "rekd":  # rekd's setup() needs the pipeline's teacher artefact; it shares MocoV2.setup
        with_bn.setup(TinyNet(STUDENT_DIM))
        assert any(isinstance(m, nn.BatchNorm1d) for m in with_bn.key_encoder.modules())


def _batch_infonce_loop(query, keys, tau: float) -> float:
    """In-batch negatives: query b's logits are q_b·k_j/τ over every key j of the batch, its own key the positive."""
    total = 0.0
    for b, q in enumerate(query):
        logits = [_dot(q, k) / tau for k in keys]
        top = max(logits)
        total += -(logits[b] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(query)


def test_batch_negatives_use_the_other_keys_of_the_batch_and_keep_no_queue():
    """negatives=batch (MoCo v3's negatives): the symmetric loss over in-batch keys, no queue kept or enqueued."""
    method, inputs, loss, queries, keys = _moco_step(negatives="batch")
    assert method.queue is None and not any(name.startswith("queue") for name in method.state_dict())
    expected = (_batch_infonce_loop(queries[0], keys[1], 0.2) + _batch_infonce_loop(queries[1], keys[0], 0.2)) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    method.after_step(inputs)  # EMA update only


@pytest.mark.parametrize("bad", ["both", "Queue", ""])
def test_negatives_is_queue_or_batch(bad):
    from pydantic import ValidationError

    assert MocoV2Params().negatives == "queue"  # published MoCo v2
    with pytest.raises(ValidationError):
        MocoV2Params(negatives=bad)
