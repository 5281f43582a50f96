"""Replay-drift spot check and output-directory safety."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache_helpers import MEAN, STD, LinearBackbone
from distillctl.cache import FeatureCache, build_cache
from distillctl.cache.drift import spot_check
from distillctl.data.datasets import ImageDataset
from distillctl.data.views import ViewSpec
from distillctl.errors import GateError, InputError
from distillctl.teachers.base import Teacher

SPEC = ViewSpec(size=16, family="simclr")


def _teacher(sha: str = "ef" * 32) -> Teacher:
    return Teacher(name="linear", arch="linear", backbone=LinearBackbone(16), embed_dim=24, sha256=sha)


@pytest.fixture(scope="module")
def built(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("drift") / "cache"
    return build_cache(_teacher(), digits, out, spec=SPEC, views=3, outputs={"pooled"}, mean=MEAN, std=STD,
                       batch_size=24, shard_size=20, progress=False)


def test_spot_check_passes_on_the_same_teacher_and_data(built, digits):
    result = spot_check(built, _teacher(), digits, samples=40)
    assert result["samples"] == 40 and result["min_cosine"]["pooled"] > 0.9999


def test_spot_check_catches_changed_pixels_and_another_teacher(built, digits):
    # same file list and sizes, but the "decoder" now returns different pixels (inverted): replay drift
    drifted = ImageDataset(name=digits.name, classes=digits.classes, labels=digits.labels,
                           arrays=np.ascontiguousarray(255 - digits.arrays))
    with pytest.raises(GateError, match="no longer matches the live teacher") as err:
        spot_check(built, _teacher(), drifted, samples=16)
    assert err.value.exit_code == 3
    with pytest.raises(GateError, match="is not the cache's"):
        spot_check(built, _teacher(sha="00" * 32), digits)


def test_incomplete_cache_cannot_be_read(built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["complete"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    partial = FeatureCache.open(copy, allow_incomplete=True)
    with pytest.raises(GateError, match="incomplete"):
        partial.view_params(0, 0)


def test_build_refuses_a_non_empty_foreign_directory(digits, tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(InputError, match="not empty and holds no feature cache"):
        build_cache(_teacher(), digits, tmp_path, spec=SPEC, views=2, outputs={"pooled"}, mean=MEAN, std=STD,
                    progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
