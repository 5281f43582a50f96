"""Weighted kNN against an independent loop-based computation and hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from distillctl.errors import InputError
from distillctl.eval.knn import knn_evaluate


def _reference_knn(train, train_labels, test, test_labels, k, temperature):
    """Plain-Python weighted kNN: cosine similarity, k largest, vote exp(sim/T), argmax (lowest label on ties)."""
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    train_u = [unit(row) for row in train.tolist()]
    correct = 0
    for query, truth in zip(test.tolist(), test_labels.tolist()):
        q = unit(query)
        sims = [(sum(a * b for a, b in zip(q, t)), i) for i, t in enumerate(train_u)]
        sims.sort(key=lambda pair: -pair[0])
        votes: dict[int, float] = {}
        for sim, i in sims[:k]:
            label = int(train_labels[i])
            votes[label] = votes.get(label, 0.0) + math.exp(sim / temperature)
        best = max(votes.values())
        prediction = min(label for label, v in votes.items() if v == best)
        correct += int(prediction == truth)
    return 100.0 * correct / len(test_labels)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_matches_loop_reference_on_random_data(temperature):
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(60, 8, generator=gen, dtype=torch.float64).float()
    test = torch.randn(25, 8, generator=gen, dtype=torch.float64).float()
    train_labels = torch.randint(0, 4, (60,), generator=gen)
    test_labels = torch.randint(0, 4, (25,), generator=gen)
    ks = (1, 3, 7, 20, 60)
    ours = knn_evaluate(train, train_labels, test, test_labels, ks=ks, temperature=temperature, chunk=4)
    for k in ks:
        assert ours[k] == pytest.approx(_reference_knn(train, train_labels, test, test_labels, k, temperature))
    # Accuracies differ across k on random data, so the test distinguishes the per-k votes.
    assert len(set(ours.values())) > 1


def test_chunking_and_scale_do_not_change_the_result():
    gen = torch.Generator().manual_seed(1)
    train, test = torch.randn(100, 16, generator=gen), torch.randn(37, 16, generator=gen)
    train_labels, test_labels = torch.randint(0, 5, (100,), generator=gen), torch.randint(0, 5, (37,), generator=gen)
    whole = knn_evaluate(train, train_labels, test, test_labels, ks=(5, 20), chunk=1024)
    pieces = knn_evaluate(train, train_labels, test, test_labels, ks=(5, 20), chunk=3)
    scaled = knn_evaluate(train * 7.0, train_labels, test * 0.1, test_labels, ks=(5, 20), chunk=5)
    assert whole == pieces == scaled


def test_weights_follow_exp_sim_over_t():
    # One close neighbour of class 1 vs two farther neighbours of class 0:
    # sharp T lets the close one win; flat T lets the count win.
    close = [math.cos(0.1), math.sin(0.1)]
    far = [math.cos(0.6), math.sin(0.6)]
    train = torch.tensor([close, far, far, [-1.0, 0.0]])
    train_labels = torch.tensor([1, 0, 0, 2])
    test, test_labels = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert knn_evaluate(train, train_labels, test, test_labels, ks=(3,), temperature=0.07)[3] == 100.0
    assert knn_evaluate(train, train_labels, test, test_labels, ks=(3,), temperature=10.0)[3] == 0.0
    assert knn_evaluate(train, train_labels, test, test_labels, ks=(1,), temperature=10.0)[1] == 100.0


def test_class_tie_goes_to_lowest_index():
    # Two neighbours at identical similarity with different labels: the vote ties exactly.
    train = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    test = torch.tensor([[1.0, 0.0]])
    assert knn_evaluate(train, torch.tensor([3, 1]), test, torch.tensor([1]), ks=(2,))[2] == 100.0
    assert knn_evaluate(train, torch.tensor([3, 1]), test, torch.tensor([3]), ks=(2,))[2] == 0.0


def test_clustered_data_is_classified_perfectly():
    gen = torch.Generator().manual_seed(2)
    centres = torch.randn(6, 32, generator=gen) * 5
    train_labels = torch.arange(6).repeat_interleave(40)
    test_labels = torch.arange(6).repeat_interleave(10)
    train = centres[train_labels] + 0.3 * torch.randn(240, 32, generator=gen)
    test = centres[test_labels] + 0.3 * torch.randn(60, 32, generator=gen)
    result = knn_evaluate(train, train_labels, test, test_labels, ks=(1, 20, 200))
    assert result == {1: 100.0, 20: 100.0, 200: 100.0}


def test_edge_cases_raise_clear_errors():
    train, labels = torch.randn(10, 4), torch.zeros(10, dtype=torch.int64)
    with pytest.raises(InputError, match="k=11 exceeds the 10 training embeddings"):
        knn_evaluate(train, labels, train, labels, ks=(5, 11))
    with pytest.raises(InputError, match="positive"):
        knn_evaluate(train, labels, train, labels, ks=(0,))
    with pytest.raises(InputError, match="shapes"):
        knn_evaluate(train, labels, torch.randn(3, 5), labels[:3], ks=(1,))
    with pytest.raises(InputError, match="out of range"):
        knn_evaluate(train, labels + 4, train, labels, ks=(1,), num_classes=3)
    # k == N is allowed (every train point votes).
    assert knn_evaluate(train, labels, train, labels, ks=(10,))[10] == 100.0
