"""Queues sized for ImageNet on a small run: the pipeline warns when a queue never fills or is longer than the
training set, and stays quiet otherwise (and for methods without a queue)."""

from __future__ import annotations

import pytest

from distillctl.config import Recipe
from distillctl.methods.base import TeacherDims, build_method
from distillctl.methods.presets import queue_warnings
from distillctl.pipeline import _images_seen

DIMS = TeacherDims(pooled=12, proj=6)


def method(name: str, **params):
    return build_method(name, params, 8, DIMS)


@pytest.mark.parametrize("name", ["seed", "compress-2q", "disco", "bingo"])
def test_right_sized_queue_gives_no_warning(name):
    assert queue_warnings(method(name, queue_size=64), train_images=1000, images_seen=5000) == []


def test_queue_longer_than_images_seen_never_fills():
    (text,) = queue_warnings(method("seed", queue_size=64), train_images=1000, images_seen=40)
    assert "64-row queue of seed never fills" in text and "about 24 rows stay at their random initialisation" in text


@pytest.mark.parametrize("name", ["mocov2", "ssl-small", "disco", "bingo"])
def test_negatives_queue_longer_than_training_set(name):
    (text,) = queue_warnings(method(name, queue_size=64), train_images=50, images_seen=5000)
    assert "longer than the training set (50 images)" in text and "queue_size <= 50" in text


@pytest.mark.parametrize("name", ["seed", "compress-1q", "compress-2q"])
def test_anchor_queue_longer_than_training_set_is_fine(name):
    assert queue_warnings(method(name, queue_size=64), train_images=50, images_seen=5000) == []


def test_published_default_on_a_small_run_gives_both_warnings():
    texts = queue_warnings(method("mocov2"), train_images=10_000, images_seen=30_000)
    assert len(texts) == 2 and "65,536-row queue of mocov2" in texts[0]


def test_methods_without_a_queue_are_quiet():
    assert queue_warnings(method("simreg"), train_images=10, images_seen=10) == []


def test_images_seen_follows_epochs_and_max_steps():
    recipe = Recipe.model_validate({"train": {"epochs": 3, "batch_size": 64}})
    assert _images_seen(recipe, 1000) == 3 * 15 * 64  # 15 full batches per epoch
    capped = Recipe.model_validate({"train": {"epochs": 3, "batch_size": 64, "max_steps": 10}})
    assert _images_seen(capped, 1000) == 640
