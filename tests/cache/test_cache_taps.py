"""Teacher taps in the feature cache: the teacher's maps stored beside the pooled outputs (PCD, dense-reg).

The stored map of view k must be the map the live teacher computes on the replayed view k (fp16 rounding
aside); a cache without a tap a run needs is refused; a tap cache resumes to the same bytes; the drift spot
check and ``verify`` cover the tap arrays too; ``--teacher-mode auto`` keeps maps out of the cache above the
size rule."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cache_helpers import MEAN, STD, build_test_cache, make_teacher
from distillctl.cache import FeatureCache
from distillctl.cache import layout
from distillctl.cache.drift import spot_check
from distillctl.data.views import ViewSpec, normalize
from distillctl.errors import GateError, InputError

SPEC = ViewSpec(size=32, family="weak", scale=(0.3, 1.0))
TAPS = ("stage:-1", "stage:-2")


def _build(teacher, dataset, out: Path, **overrides) -> FeatureCache:
    return build_test_cache(teacher, dataset, out, **{"spec": SPEC, "views": 3, "outputs": {"pooled"}, "taps": TAPS,
                                                      "batch_size": 12, **overrides})


@pytest.fixture(scope="module")
def tap_cache(image_folder, tmp_path_factory) -> FeatureCache:
    return _build(make_teacher(), image_folder, tmp_path_factory.mktemp("taps") / "cache")


def test_stored_maps_are_the_live_teacher_maps_of_the_replayed_views(tap_cache, image_folder):
    teacher = make_teacher()
    teacher.set_bn_mode("eval")  # as the build ran it
    rng = np.random.default_rng(3)
    index = torch.from_numpy(rng.integers(0, len(image_folder), size=20))
    k = torch.from_numpy(rng.integers(0, 3, size=20))
    cached = tap_cache.lookup(index, k, taps=TAPS)
    views = torch.stack([tap_cache.replay(image_folder.load_image(int(i)), int(i), int(v)) for i, v in zip(index, k)])
    online = teacher.forward(normalize(views, MEAN, STD), {"pooled"}, taps=TAPS)
    channels = [info["num_chs"] for info in teacher.backbone.feature_info]
    assert cached["stage:-1"].shape == (20, channels[-1], 1, 1)  # 32 px at stride 32
    assert cached["stage:-2"].shape == (20, channels[-2], 2, 2)  # stride 16: a real 2x2 map
    for name in ("pooled", *TAPS):
        assert cached[name].dtype == torch.float32
        torch.testing.assert_close(cached[name], online[name], rtol=1e-3, atol=2e-3)
    # the map of another view is another map (the cache does not store one crop K times)
    pair = tap_cache.lookup(torch.tensor([5, 5]), torch.tensor([1, 2]), taps=("stage:-2",))["stage:-2"]
    assert not torch.allclose(pair[0], pair[1])


def test_manifest_names_each_tap_its_directory_and_shape(tap_cache):
    taps = tap_cache.manifest["teacher"]["taps"]
    assert set(taps) == set(TAPS)
    assert taps["stage:-2"]["dir"] == "tap-stage_-2" and len(taps["stage:-2"]["shape"]) == 3
    assert set(tap_cache.manifest["teacher"]["outputs"]) == {"pooled"}  # taps are not outputs
    rows = np.load(tap_cache.path / "tap-stage_-2" / "shard_00000.npy", mmap_mode="r")
    assert rows.dtype == np.float16 and rows.shape == (16 * 3, int(np.prod(taps["stage:-2"]["shape"])))
    info = tap_cache.info()
    assert info["taps"] == taps
    assert tap_cache.verify().ok and tap_cache.verify().shards_checked == 3


def test_lookup_returns_maps_only_when_asked_and_refuses_unknown_taps(tap_cache):
    plain = tap_cache.lookup(torch.tensor([0, 1]), torch.tensor([0, 2]))
    assert set(plain) == {"pooled"}
    with pytest.raises(InputError, match="holds no teacher tap 'stage:1'"):
        tap_cache.lookup(torch.tensor([0]), torch.tensor([0]), taps=("stage:1",))


def test_verify_reports_a_corrupted_tap_shard(image_folder, tmp_path):
    cache = _build(make_teacher(), image_folder, tmp_path / "c", taps=("stage:-2",))
    file = tmp_path / "c" / "tap-stage_-2" / "shard_00001.npy"
    rows = np.load(file)
    rows[4] = np.nan
    np.save(file, rows)
    report = cache.verify()
    assert not report.ok
    assert any("shard 1 tap-stage_-2: sha256 mismatch" in p for p in report.problems)
    assert any("shard 1 tap-stage_-2" in p and "non-finite" in p for p in report.problems)


def test_a_cache_without_the_tap_is_refused_and_a_tap_cache_serves_plain_runs(digits, tmp_path):
    _build(make_teacher(), digits, tmp_path / "plain", taps=())
    with pytest.raises(GateError, match=r"teacher taps \[\] \(cache\) lack \['stage:-1'\] \(run\)"):
        _build(make_teacher(), digits, tmp_path / "plain", taps=("stage:-1",))
    plain = FeatureCache.open(tmp_path / "plain")
    assert plain.taps == {} and not (tmp_path / "plain" / "tap-stage_-1").exists()
    with pytest.raises(GateError, match="lack \\['stage:-1'\\]"):
        plain.check_compatible(teacher_sha256=make_teacher().sha256, outputs={"pooled"},
                               dataset_hash=digits.manifest_hash(), spec=SPEC, mean=MEAN, std=STD, taps=("stage:-1",))

    _build(make_teacher(), digits, tmp_path / "taps", taps=("stage:-1",))
    teacher = make_teacher()
    teacher.backbone.forward = lambda images: (_ for _ in ()).throw(AssertionError("teacher must not run"))
    reused = _build(teacher, digits, tmp_path / "taps", taps=())  # a run without taps reuses the tap cache
    assert set(reused.taps) == {"stage:-1"}


def test_a_cache_without_taps_keeps_its_fingerprint():
    from distillctl.cache.build import cache_fingerprint

    args = ("ab" * 32, {"pooled"}, "cd" * 32, SPEC, 3, MEAN, STD, 0)
    assert cache_fingerprint(*args) == cache_fingerprint(*args, ())
    assert cache_fingerprint(*args) != cache_fingerprint(*args, ("stage:-1",))


def test_interrupted_tap_build_resumes_to_identical_bytes(digits, tmp_path):
    _build(make_teacher(), digits, tmp_path / "ref", batch_size=6)

    class Interrupt(Exception):
        pass

    calls = {"n": 0}

    def stop(info):
        calls["n"] += 1
        if calls["n"] == 11:
            raise Interrupt

    with pytest.raises(Interrupt):
        _build(make_teacher(), digits, tmp_path / "resumed", batch_size=6, on_batch=stop, flush_seconds=0.0)
    _build(make_teacher(), digits, tmp_path / "resumed", batch_size=6)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes()
                for sub in ("params", "pooled", *(layout.tap_dir(tap) for tap in TAPS)) for p in (root / sub).glob("*.npy")}

    reference = files(tmp_path / "ref")
    assert len(reference) == 4 * 3 and files(tmp_path / "resumed") == reference


def test_a_tap_directory_is_not_foreign_to_the_build(digits, tmp_path):
    out = tmp_path / "c"
    (out / "tap-stage_-1").mkdir(parents=True)  # left by a build killed before its manifest was written
    assert _build(make_teacher(), digits, out, taps=("stage:-1",)).is_complete()


def test_spot_check_compares_the_maps_too(digits, tmp_path):
    cache = _build(make_teacher(), digits, tmp_path / "c", taps=("stage:-2",))
    result = spot_check(cache, make_teacher(), digits, samples=30)
    assert result["min_cosine"]["stage:-2"] > 0.999 and "pooled" in result["min_cosine"]
    # another map under the same hashes: the live teacher no longer agrees (what a changed decoder looks like)
    file = tmp_path / "c" / "tap-stage_-2" / "shard_00000.npy"
    np.save(file, -np.load(file))
    with pytest.raises(GateError, match="stage:-2 cosine"):
        spot_check(FeatureCache.open(tmp_path / "c"), make_teacher(), digits, samples=30)


def _pcd(teacher):
    from distillctl.methods.base import TeacherDims, build_method

    method = build_method("pcd", {"queue_size": 64, "hidden_dim": 16}, 32,
                          TeacherDims(teacher.embed_dim, None, backbone=teacher.backbone))
    return method.requirements(32)


@pytest.mark.parametrize("requested, limit, expected", [
    ("auto", None, "cached"),  # a 1x1x... map of 48 images: far below the limit
    ("auto", 1000, "online"),  # above the limit: auto keeps the maps out of the cache, and says so
    ("cached", 1000, "cached"),  # an explicit request wins
    ("online", None, "online"),
])
def test_auto_caches_teacher_maps_up_to_the_size_rule(requested, limit, expected, monkeypatch, caplog):
    from distillctl import pipeline

    teacher = make_teacher()
    requirements = _pcd(teacher)
    assert requirements.teacher_taps == ("stage:-1",) and requirements.teacher_mode == "cached_exact"
    expected_bytes = 2 * teacher.backbone.feature_info[-1]["num_chs"] * 1 * 1 * 4 * 48
    teacher.set_bn_mode("train")
    before = {key: value.clone() for key, value in teacher.backbone.state_dict().items()}
    assert pipeline.tap_cache_bytes(teacher, requirements, 48, 4) == expected_bytes
    # the probe ran in eval mode (BatchNorm statistics untouched) and gave the teacher its mode back
    assert teacher.backbone.training
    assert all(value.equal(before[key]) for key, value in teacher.backbone.state_dict().items())
    if limit is not None:
        monkeypatch.setattr(pipeline, "TAP_CACHE_AUTO_BYTES", limit)
    recipe = SimpleNamespace(teacher=SimpleNamespace(mode=requested, cache_views=4), method=SimpleNamespace(name="pcd"))
    with caplog.at_level("INFO", logger="distillctl"):
        mode = pipeline._teacher_mode(recipe, requirements, "eval", False, teacher, 48)
    assert mode == expected
    if requested == "auto" and expected == "online":
        assert f"would take {expected_bytes / 2**30:.1f} GiB for 48 images x 4 views" in caplog.text
        assert "--teacher-mode cached forces it" in caplog.text
