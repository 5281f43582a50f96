"""BINGO: loss against loops, CutMix area correction, kNN bags, neighbour draws, schedule, queue."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from distillctl.methods.bingo import Bingo, BingoParams, bingo_loss, build_bag_table, draw_neighbours
from distillctl.methods.shared import CutBox, NeighbourView, cutmix, sample_cutmix_box
from method_harness import STUDENT_DIM, TEACHER_DIMS, TinyNet, TinyTeacher, make_images, make_inputs


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def ell(u, p, queue, tau) -> float:
    logits = [dot(u, p) / tau] + [dot(u, q) / tau for q in queue]
    return -(logits[0] - math.log(sum(math.exp(v) for v in logits)))


def reference(si, sj, sm, ti, tj, queue, tau, a, b, lam) -> float:
    n = len(si)
    total = 0.0
    for r in range(n):
        total += a * ell(si[r], ti[r], queue, tau) + b * ell(si[r], tj[r], queue, tau)
        total += a * ell(sj[r], tj[r], queue, tau) + b * ell(sj[r], ti[r], queue, tau)
        total += lam * ell(sm[r], ti[r], queue, tau) + (1 - lam) * ell(sm[r], tj[r], queue, tau)
    return total / n / 3


@pytest.mark.parametrize("weights,lam", [((1.0, 0.0), 0.3), ((0.5, 0.5), 0.77)])
def test_bingo_loss_matches_loop(weights, lam) -> None:
    g = torch.Generator().manual_seed(0)
    si, sj, sm, ti, tj = (F.normalize(torch.randn(4, 5, generator=g, dtype=torch.float64), dim=1) for _ in range(5))
    queue = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    loss, _ = bingo_loss(si, sj, sm, ti, tj, queue, 0.2, weights, lam)
    expected = reference(si.tolist(), sj.tolist(), sm.tolist(), ti.tolist(), tj.tolist(), queue.tolist(), 0.2, *weights, lam)
    assert float(loss) == pytest.approx(expected, rel=1e-10)


def test_cutmix_area_correction_counts_pasted_pixels() -> None:
    base = torch.zeros(2, 3, 10, 10)
    patch = torch.ones(2, 3, 10, 10)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        lam = float(rng.beta(2, 2))
        box = sample_cutmix_box(10, 10, lam, rng)
        mixed, corrected = cutmix(base, patch, box)
        pasted = sum(1 for y in range(10) for x in range(10) if mixed[0, 0, y, x] == 1.0)
        assert corrected == pytest.approx(1 - pasted / 100)
        assert torch.equal(base, torch.zeros_like(base))  # inputs untouched
    # a box whose centre sits in the corner is clipped: λ is corrected to the visible area, not 1−(cut area)
    clipped = CutBox(top=0, left=0, height=3, width=2)
    _, corrected = cutmix(base, patch, clipped)
    assert corrected == pytest.approx(1 - 6 / 100)


def test_clipped_box_from_sampler() -> None:
    class CornerRng:  # centre at (0, 0): half of the cut falls outside the image
        def integers(self, high):
            return 0

    box = sample_cutmix_box(8, 8, 0.75, CornerRng())  # cut side = 8·sqrt(0.25) = 4, clipped to 2
    assert (box.top, box.left, box.height, box.width) == (0, 0, 2, 2)


def test_knn_bags_match_brute_force_and_exclude_self() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(9, 4, generator=g, dtype=torch.float64)
    bags = build_bag_table(feats, k=3)
    unit = [[x / math.sqrt(dot(r, r)) for x in r] for r in feats.tolist()]
    for i in range(9):
        distances = sorted((math.dist(unit[i], unit[j]), j) for j in range(9) if j != i)
        assert bags[i].tolist() == [j for _, j in distances[:3]]
    small = build_bag_table(feats, k=2)
    assert small.shape == (9, 2)


def test_draw_neighbours_deterministic_members() -> None:
    bags = torch.tensor([[1, 2], [0, 2], [0, 1], [1, 2]])
    index = torch.tensor([3, 0, 2])
    first = draw_neighbours(bags, index, seed=5, epoch=1)
    assert torch.equal(first, draw_neighbours(bags, index, seed=5, epoch=1))
    for i, j in zip(index.tolist(), first.tolist()):
        assert j in bags[i].tolist()
    # the draw of one sample does not depend on which other samples share its batch
    assert int(draw_neighbours(bags, torch.tensor([2]), 5, 1)[0]) == int(first[2])


def test_method_views_schedule_and_queue() -> None:
    method = Bingo(BingoParams(queue_size=6, hidden_dim=16), STUDENT_DIM, TEACHER_DIMS)
    req = method.requirements(16)
    assert [(v.teacher, v.student, isinstance(v, NeighbourView)) for v in req.views] == [
        (False, True, False), (True, False, False), (False, True, True), (True, False, True)]
    assert req.needs_index and req.teacher_bn == "train"
    assert method.bag_weights(10.9) == (1.0, 0.0) and method.bag_weights(11.0) == (0.5, 0.5)
    student, teacher = TinyNet(STUDENT_DIM), TinyTeacher()
    images = make_images(method, 4, 16)
    inputs = make_inputs(method, student, [teacher], images, step=3)
    loss, logs = method.loss(inputs)
    again, _ = method.loss(make_inputs(method, student, [teacher], images, step=3))
    assert float(loss.detach()) == pytest.approx(float(again.detach()))  # same step: same CutMix box and λ
    assert 0.0 <= logs["mix_lambda"] <= 1.0
    method.after_step(inputs)
    expected_keys = F.normalize(teacher(images[1])["proj"], dim=1)
    assert torch.allclose(method.queue.data[:4], expected_keys) and int(method.queue.ptr) == 4
    method.after_step(inputs)  # wraps: rows 4,5 then 0,1
    assert torch.allclose(method.queue.data[:2], expected_keys[2:]) and int(method.queue.ptr) == 2


def test_params() -> None:
    p = BingoParams()
    assert (p.queue_size, p.temperature, p.bag_size, p.mix_alpha, p.bag_warmup_epochs) == (65536, 0.2, 5, 2.0, 11)
    with pytest.raises(ValidationError):
        BingoParams(k=5)
