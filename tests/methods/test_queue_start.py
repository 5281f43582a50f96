"""queue_start=batch (the MoCo family's auto start): written queue rows plus the batch's other keys as negatives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillctl.methods.common import batch_key_exclusion, info_nce_with_batch
from distillctl.methods.presets import RunSize, derive, method_facts
from distillctl.methods.rekd import relation_info_nce


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def test_batch_key_exclusion_marks_each_querys_own_image_in_every_view_block():
    own = batch_key_exclusion(3, 2, torch.device("cpu"))
    assert own.shape == (3, 6)
    assert [row.nonzero().flatten().tolist() for row in own] == [[0, 3], [1, 4], [2, 5]]


@pytest.mark.parametrize("bank_rows", [0, 5])  # 0: the very first step, nothing written yet
def test_info_nce_with_batch_matches_a_loop(bank_rows):
    batch, dim, tau = 4, 6, 0.2
    query, key1, key2 = _unit(batch, dim, seed=1), _unit(batch, dim, seed=2), _unit(batch, dim, seed=3)
    bank = _unit(bank_rows, dim, seed=4) if bank_rows else torch.zeros(0, dim, dtype=torch.float64)
    keys = torch.cat([key1, key2])
    got = info_nce_with_batch(query, key2, bank, keys, batch_key_exclusion(batch, 2, keys.device), tau)
    total = 0.0
    for b in range(batch):
        negatives = [bank[j] for j in range(bank_rows)] + [keys[j] for j in range(2 * batch) if j % batch != b]
        logits = [float(query[b] @ key2[b]) / tau] + [float(query[b] @ n) / tau for n in negatives]
        total += math.log(sum(math.exp(v) for v in logits)) - logits[0]
    assert float(got) == pytest.approx(total / batch, rel=1e-12)


def test_relation_loss_drops_excluded_rows_from_the_softmax_and_the_positives():
    batch, rows, tau, weight = 3, 7, 0.2, 1.0
    query, positive, bank = _unit(batch, 5, seed=5), _unit(batch, 5, seed=6), _unit(rows, 5, seed=7)
    related = torch.zeros(batch, rows, dtype=torch.bool)
    related[0, [1, 4]] = True
    related[2, 6] = True  # excluded below: must not count as a positive
    exclude = torch.zeros(batch, rows, dtype=torch.bool)
    exclude[0, 2] = exclude[2, 6] = exclude[1, 0] = True
    got = relation_info_nce(query, positive, bank, related, tau, weight, exclude)
    total = 0.0
    for b in range(batch):
        kept = [j for j in range(rows) if not exclude[b, j]]
        logits = {"pos": float(query[b] @ positive[b]) / tau, **{j: float(query[b] @ bank[j]) / tau for j in kept}}
        log_z = math.log(sum(math.exp(v) for v in logits.values()))
        positives = ["pos"] + [j for j in kept if related[b, j]]
        total += -sum(logits[p] - log_z for p in positives) / len(positives)
    assert torch.isfinite(got) and float(got) == pytest.approx(total / batch, rel=1e-12)


@pytest.mark.parametrize("method", ["mocov2", "ssl-small", "rekd"])
def test_auto_starts_the_queue_from_the_batch_and_published_keeps_random_rows(method):
    from distillctl.methods.base import get_method

    facts = method_facts(get_method(method))
    size = RunSize(dataset_images=10_000, batch_size=64, images_seen=30_000)
    auto = {d.key: d for d in derive(facts, size, "auto")}
    assert auto["method.params.queue_start"].value == "batch"
    assert auto["method.params.queue_start"].published == "random" and "collapse" in auto["method.params.queue_start"].reason
    published = {d.key: d.value for d in derive(facts, size, "published")}
    assert published["method.params.queue_start"] == "random"
    imagenet = {d.key: d.value for d in derive(facts, RunSize(dataset_images=1_281_167, batch_size=256,
                                                               images_seen=256_000_000), "auto")}
    assert imagenet["method.params.queue_start"] == "random"  # ImageNet-sized data: the paper's start
    explicit = {d.key for d in derive(facts, size, "auto", explicit={"method.params.queue_start"})}
    assert "method.params.queue_start" not in explicit  # a value the user set is never derived


def test_mocov2_uses_written_rows_and_batch_keys_until_the_queue_is_full():
    from distillctl.methods.mocov2 import MocoV2, MocoV2Params

    method = MocoV2(MocoV2Params(queue_size=8, out_dim=4, queue_start="batch"), student_dim=6)
    assert method.negative_bank().shape == (0, 4) and method.batch_negatives()
    method.queue.enqueue(_unit(6, 4, seed=8).float(), gather=False)
    assert method.negative_bank().shape == (6, 4) and method.batch_negatives()
    method.queue.enqueue(_unit(6, 4, seed=9).float(), gather=False)  # wraps: every row written
    assert method.negative_bank().shape == (8, 4) and not method.batch_negatives()
    random_start = MocoV2(MocoV2Params(queue_size=8, out_dim=4), student_dim=6)
    assert random_start.negative_bank().shape == (8, 4) and not random_start.batch_negatives()
