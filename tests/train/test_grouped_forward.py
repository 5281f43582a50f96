"""Grouped multi-view forward: same-resolution views go through the network as one batch (train-mode
BatchNorm sees the group's statistics), split back per view; per-view stays one call per view."""

from __future__ import annotations

import timm
import torch

from distillctl.data.views import ViewSpec
from distillctl.methods.base import MethodView, Requirements
from distillctl.taps import TapRecorder
from distillctl.train.forward import student_forward

BIG = MethodView(ViewSpec(size=16, family="mocov2"))
SMALL = MethodView(ViewSpec(size=8, family="mocov2"))


def _setup():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=0).train()
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(4, 3, s, s, generator=generator) for s in (16, 16, 8, 8, 8)]
    return model, images


def test_groups_by_resolution_in_slot_order():
    requirements = Requirements(views=(BIG, SMALL, BIG, SMALL), grouping="by_resolution")
    assert requirements.forward_groups([0, 1, 2, 3]) == [[0, 2], [1, 3]]
    assert requirements.forward_groups([1, 2]) == [[1], [2]]
    assert Requirements(views=(BIG, BIG)).forward_groups([0, 1]) == [[0], [1]]


def test_grouped_forward_equals_the_concatenated_manual_forward():
    model, images = _setup()
    requirements = Requirements(views=(BIG, BIG, SMALL, SMALL, SMALL), grouping="by_resolution")
    recorder = TapRecorder(model, ("stage:-1",)).attach()
    features, taps = student_forward(model, recorder, requirements, images, [0, 1, 2, 3, 4])
    recorder.detach()
    manual_big = model(torch.cat(images[:2]))
    manual_small = model(torch.cat(images[2:]))
    expected = list(manual_big.split(4)) + list(manual_small.split(4))
    for got, want in zip(features, expected):
        assert got.equal(want)
    assert taps[1]["stage:-1"].equal(model.forward_features(torch.cat(images[:2]))[4:])
    # per view: one call per view, and train-mode BN makes the difference visible
    per_view, _ = student_forward(model, TapRecorder(model, ()), Requirements(views=requirements.views),
                                  images, [0, 1, 2, 3, 4])
    for got, view in zip(per_view, images):
        assert got.equal(model(view))
    assert not per_view[0].equal(features[0])


def test_grouped_gradients_equal_the_concatenated_forward():
    model, images = _setup()
    requirements = Requirements(views=(BIG, BIG), grouping="by_resolution")
    features, _ = student_forward(model, TapRecorder(model, ()), requirements, images[:2], [0, 1])
    (features[0].sum() + 2 * features[1].sum()).backward()
    grouped = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = model(torch.cat(images[:2]))
    (out[:4].sum() + 2 * out[4:].sum()).backward()
    for got, p in zip(grouped, model.parameters()):
        assert got.equal(p.grad)
