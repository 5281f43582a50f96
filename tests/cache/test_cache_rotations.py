"""Rotated copies in the feature cache (DLKD shows every image at 0/90/180/270°).

A cache built with ``turns`` T stores each of its K crops at quarter turns 0..T-1: row j of an image is crop
j // T rotated by j % T, and its teacher outputs are the live teacher's on exactly that rotated replay. A run
that needs rotations is refused by a cache without them; the trainer replays, for each slot, a stored row at
that slot's rotation; an unrotated cache keeps its fingerprint and its view draws."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from cache_helpers import MEAN, STD, build_test_cache, make_teacher
from distillctl.cache import FeatureCache
from distillctl.cache.build import cache_fingerprint
from distillctl.cache.drift import spot_check
from distillctl.cache.store import manifest_differences
from distillctl.data.views import ViewSpec, normalize, sample_rng
from distillctl.errors import GateError
from distillctl.methods.base import MethodView, Requirements, TeacherDims, cacheability
from distillctl.methods.dlkd import DLKD, DLKDParams
from distillctl.train.data import ViewDataset

SPEC = ViewSpec(size=24, family="weak", scale=(0.5, 1.0))
CROPS, TURNS = 3, 4


def _build(teacher, dataset, out, **overrides) -> FeatureCache:
    return build_test_cache(teacher, dataset, out, **{"spec": SPEC, "views": CROPS, "turns": TURNS,
                                                      "outputs": {"pooled", "proj"}, "batch_size": 24, **overrides})


@pytest.fixture(scope="module")
def rotated_cache(image_folder, tmp_path_factory) -> FeatureCache:
    return _build(make_teacher(), image_folder, tmp_path_factory.mktemp("rotations") / "cache")


def test_rows_are_each_crop_at_every_rotation_with_the_live_teachers_outputs(rotated_cache, image_folder):
    cache = rotated_cache
    assert (cache.views, cache.turns, cache.crops) == (CROPS * TURNS, TURNS, CROPS)
    image = image_folder.load_image(7)
    for crop in range(CROPS):
        upright = cache.replay(image, 7, crop * TURNS)
        records = cache.params_records(np.full(TURNS, 7), np.arange(crop * TURNS, (crop + 1) * TURNS))
        assert all(record == records[0] for record in records)  # one crop, four rows
        for turns in range(1, TURNS):
            replayed = cache.replay(image, 7, crop * TURNS + turns)
            assert torch.equal(replayed, torch.rot90(upright, turns, dims=(-2, -1)))
            assert cache.view_spec(crop * TURNS + turns).quarter_turns == turns
    assert cache.view_spec(1).family == "centre" and cache.view_spec(TURNS).family == "weak"  # crop 0: the centre

    teacher = make_teacher()
    teacher.set_bn_mode("eval")
    index = torch.tensor([3, 3, 3, 3, 20, 39])
    k = torch.tensor([4, 5, 6, 7, 2, 11])
    views = torch.stack([cache.replay(image_folder.load_image(int(i)), int(i), int(v)) for i, v in zip(index, k)])
    live = teacher.forward(normalize(views, MEAN, STD), {"pooled", "proj"})
    cached = cache.lookup(index, k)
    for name in ("pooled", "proj"):
        torch.testing.assert_close(cached[name], live[name], rtol=1e-3, atol=2e-3)
    # the teacher is not rotation-invariant: the rotations of one crop are four different targets
    assert min(torch.dist(cached["pooled"][0], cached["pooled"][t]) for t in (1, 2, 3)) > 1e-2


def test_manifest_records_the_rotations_and_an_unrotated_spec(rotated_cache, image_folder):
    manifest = json.loads((rotated_cache.path / "manifest.json").read_text())
    assert manifest["views"] == CROPS * TURNS and manifest["transform"]["turns"] == TURNS
    assert "quarter_turns" not in manifest["transform"]["spec"]
    info = rotated_cache.info()
    assert info["turns"] == TURNS and info["views"] == CROPS * TURNS
    assert rotated_cache.verify().ok
    drift = spot_check(rotated_cache, make_teacher(), image_folder, samples=24)
    assert drift["min_cosine"]["pooled"] > 0.999  # the check replays each sampled row at its rotation


def test_a_run_that_rotates_refuses_a_cache_without_rotations_and_not_the_reverse(rotated_cache, image_folder,
                                                                                   tmp_path):
    plain = _build(make_teacher(), image_folder, tmp_path / "plain", turns=1, outputs={"pooled"})
    expected = dict(teacher_sha256=plain.manifest["teacher"]["sha256"], outputs={"pooled"},
                    dataset_hash=image_folder.manifest_hash(), spec=SPEC, mean=MEAN, std=STD)
    with pytest.raises(GateError, match=r"rotations 1 \(cache: quarter turns 0..0\) vs 4 \(run: 0..3\)"):
        plain.check_compatible(**expected, turns=4)
    plain.check_compatible(**expected)  # unrotated run: fine
    rotated_cache.check_compatible(**expected)  # a run without rotations reads rows at quarter turn 0
    rotated_cache.check_compatible(**{**expected, "spec": dataclasses.replace(SPEC, quarter_turns=3)}, turns=4)
    # K counts crops, not rows
    assert manifest_differences(rotated_cache.manifest, **expected, views=CROPS, turns=TURNS) == []
    assert manifest_differences(rotated_cache.manifest, **expected, views=CROPS * TURNS) == \
        [f"views K={CROPS} (cache) vs {CROPS * TURNS} (run)"]
    # rebuilding the plain directory with rotations is refused, and leaves it as it was
    before = {p: p.read_bytes() for p in (tmp_path / "plain").rglob("*") if p.is_file()}
    with pytest.raises(GateError, match="rotations"):
        _build(make_teacher(), image_folder, tmp_path / "plain", outputs={"pooled"})
    assert {p: p.read_bytes() for p in (tmp_path / "plain").rglob("*") if p.is_file()} == before


def test_an_unrotated_cache_keeps_its_fingerprint():
    args = ("ab" * 32, {"pooled"}, "cd" * 32, SPEC, 3, MEAN, STD, 0)
    assert cache_fingerprint(*args) == cache_fingerprint(*args, (), 1)
    assert cache_fingerprint(*args) != cache_fingerprint(*args, (), 4)


def test_trainer_replays_each_slot_at_its_rotation_with_distinct_crops(rotated_cache, image_folder, tmp_path):
    specs = [dataclasses.replace(SPEC, quarter_turns=t) for t in range(TURNS)]
    four = _build(make_teacher(), image_folder, tmp_path / "four", views=4, outputs={"pooled"})
    for cache, distinct in ((four, True), (rotated_cache, False)):  # K = 4 crops for 4 slots; K = 3: drawn freely
        data = ViewDataset(image_folder, specs, seed=5, epoch=2, cache=cache, cached_slots=range(TURNS))
        for index in range(len(image_folder)):
            rows = data.stored_views(index)
            assert [rows[slot] % TURNS for slot in range(TURNS)] == [0, 1, 2, 3]
            assert all(0 <= row < cache.views for row in rows.values())
            if distinct:  # the official code crops each rotated copy on its own: four different crops
                assert len({rows[slot] // TURNS for slot in range(TURNS)}) == TURNS
        views, _, _, stored, _, _ = data[9]
        image = image_folder.load_image(9)
        for slot in range(TURNS):
            assert torch.equal(views[slot], cache.replay(image, 9, int(stored[slot])))


def test_an_unrotated_cache_draws_views_as_before(image_folder, tmp_path):
    plain = _build(make_teacher(), image_folder, tmp_path / "plain", turns=1, views=5, outputs={"pooled"})
    data = ViewDataset(image_folder, [SPEC, SPEC], seed=5, epoch=1, cache=plain, cached_slots=[0, 1])
    for index in range(10):  # the draw of the release before rotations: a permutation of the K views
        before = sample_rng(5, 1, index, 1 << 16).permutation(5)[:2]
        assert data.stored_views(index) == {0: int(before[0]), 1: int(before[1])}


def test_dlkd_is_cacheable_and_two_augmentations_still_are_not():
    requirements = DLKD(DLKDParams(), 8, TeacherDims(pooled=6)).requirements(24)
    assert cacheability(requirements, "eval") == ("cached_exact", "")
    two = Requirements(views=(MethodView(SPEC), MethodView(dataclasses.replace(SPEC, quarter_turns=1)),
                              MethodView(ViewSpec(size=24, family="mocov2"))))
    assert cacheability(two, "eval")[0] == "no"
