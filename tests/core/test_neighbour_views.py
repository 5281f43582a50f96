"""BINGO-style neighbour views: the trainer shows a teacher-kNN neighbour, and its teacher target is the neighbour's."""

from __future__ import annotations

import torch

from distillctl.data.datasets import open_dataset
from distillctl.data.views import ViewSpec, apply_view_uint8, sample_rng, sample_view
from distillctl.train.data import ViewDataset, collate_views, draw_neighbour


def test_neighbour_slots_show_the_drawn_bag_member():
    data = open_dataset("builtin:digits").subset(range(40))
    bags = torch.stack([torch.tensor([(i + 1) % 40, (i + 2) % 40, (i + 3) % 40]) for i in range(40)])
    spec = ViewSpec(size=16, family="weak")
    dataset = ViewDataset(data, [spec, spec, spec], seed=3, epoch=2, neighbour_slots=[1, 2], bags=bags)
    batch, bad = collate_views([dataset[i] for i in range(8)])
    views, _labels, index, _stored, sources = batch
    assert not bad
    for row, i in enumerate(index.tolist()):
        j = draw_neighbour(bags, i, seed=3, epoch=2)
        assert j in bags[i].tolist() and j != i
        assert sources[row].tolist() == [i, j, j]
        expected = apply_view_uint8(data.load_image(j), sample_view(spec, 32, 32, sample_rng(3, 2, i, 1)), spec)
        assert torch.equal(views[1][row], expected)
    # the draw changes with the epoch but not with anything else
    draws = {draw_neighbour(bags, 5, seed=3, epoch=e) for e in range(20)}
    assert draws == set(bags[5].tolist())
