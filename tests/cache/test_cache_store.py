"""Reading the cache: corruption is refused (verify, open), mismatched runs are refused, info/verify CLI."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_helpers import MEAN, STD, TEACHER_SHA, make_teacher
from distillctl.cache import FeatureCache, build_cache
from distillctl.cli import main
from distillctl.data.views import ViewSpec
from distillctl.errors import GateError, InputError

SPEC = ViewSpec(size=20, family="weak")


@pytest.fixture(scope="module")
def built(digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "cache"
    build_cache(make_teacher(), digits, out, spec=SPEC, views=2, outputs={"pooled", "proj"}, mean=MEAN, std=STD,
                batch_size=16, shard_size=20, progress=False)
    return out


@pytest.fixture
def copy(built, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(built, target)
    return target


def _cli(argv: list[str]) -> int:
    """Exit code of ``distillctl ARGV`` run in-process (0 when main returns normally)."""
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _flip_byte(path: Path, offset_from_end: int = 7) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def test_clean_cache_opens_and_verifies(built, capsys):
    cache = FeatureCache.open(built, verify=True)
    assert cache.is_complete() and cache.views == 2 and cache.outputs == {"pooled": 96, "proj": 16}
    assert cache.spec == SPEC and cache.mean == MEAN and cache.std == STD
    assert _cli(["cache", "verify", str(built), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["shards_checked"] == 3 and report["problems"] == []


@pytest.mark.parametrize("target", ["pooled/shard_00001.npy", "params/shard_00002.npy", "proj/shard_00000.npy"])
def test_flipped_byte_is_refused_by_verify_and_open(copy, target, capsys):
    _flip_byte(copy / target)
    assert _cli(["cache", "verify", str(copy), "--json"]) == 3
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    shard = int(target.split("_")[1][:5])
    kind = target.split("/")[0]
    assert not report["ok"]
    assert any(p.startswith(f"shard {shard} {kind}: sha256 mismatch") for p in report["problems"])
    assert "failed verification" in captured.err
    with pytest.raises(GateError, match="failed verification") as err:
        FeatureCache.open(copy, verify=True)
    assert err.value.exit_code == 3


def test_zero_row_with_fixed_hash_is_still_caught(copy):
    """A zeroed row is reported even when someone also rewrote the manifest's hash."""
    path = copy / "pooled" / "shard_00000.npy"
    array = np.load(path)
    array[3] = 0
    np.save(path, array)
    manifest = json.loads((copy / "manifest.json").read_text())
    from distillctl.cache.layout import sha256_file

    manifest["shards"][0]["sha256"]["pooled"] = sha256_file(path)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    report = FeatureCache.open(copy).verify()
    assert report.problems == ["shard 0 pooled: 1 all-zero rows (unwritten or dead features)"]


def test_missing_truncated_or_incomplete_caches_are_refused(copy, tmp_path):
    with pytest.raises(InputError, match="manifest.json missing") as err:
        FeatureCache.open(tmp_path / "nowhere")
    assert err.value.exit_code == 2
    truncated = copy / "proj" / "shard_00001.npy"
    truncated.write_bytes(truncated.read_bytes()[:-64])
    with pytest.raises(GateError, match="shard_00001"):
        FeatureCache.open(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["complete"] = False
    manifest["shards"][2]["status"] = "partial"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GateError, match=r"incomplete \(2/3 shards sealed\)"):
        FeatureCache.open(copy)
    assert not FeatureCache.open(copy, allow_incomplete=True).is_complete()
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(GateError, match="unreadable"):
        FeatureCache.open(copy)


def _compatible_kwargs(digits) -> dict:
    return dict(teacher_sha256=TEACHER_SHA, outputs={"pooled"}, dataset_hash=digits.manifest_hash(), spec=SPEC,
                mean=MEAN, std=STD)


def test_check_compatible_accepts_the_matching_run(built, digits):
    FeatureCache.open(built).check_compatible(**_compatible_kwargs(digits))
    FeatureCache.open(built).check_compatible(**(_compatible_kwargs(digits) | {"outputs": {"pooled", "proj"}}))


@pytest.mark.parametrize("change, message", [
    ({"teacher_sha256": "cd" * 32}, "teacher sha256 ababababab"),
    ({"dataset_hash": "0" * 64}, "dataset manifest"),
    ({"spec": ViewSpec(size=24, family="weak")}, "view spec size=20 (cache) vs 24 (run)"),
    ({"spec": ViewSpec(size=20, family="mocov2")}, "family='weak' (cache) vs 'mocov2' (run)"),
    ({"mean": (0.485, 0.456, 0.406)}, "normalisation mean"),
])
def test_check_compatible_refuses_mismatches(built, digits, change, message):
    with pytest.raises(GateError) as err:
        FeatureCache.open(built).check_compatible(**(_compatible_kwargs(digits) | change))
    assert err.value.exit_code == 3
    assert message in err.value.message


def test_check_compatible_refuses_another_dataset(built, digits):
    from distillctl.data.datasets import open_dataset

    other = open_dataset("builtin:digits").subset(range(1, 49), name=digits.name)  # same size and name, other images
    with pytest.raises(GateError, match="dataset manifest"):
        FeatureCache.open(built).check_compatible(**(_compatible_kwargs(digits) | {"dataset_hash": other.manifest_hash()}))


def test_cache_survives_pickling_without_copying_shards(built):
    cache = FeatureCache.open(built)
    before = cache.lookup(torch.tensor([3, 47]), torch.tensor([1, 0]))
    payload = pickle.dumps(cache)
    assert len(payload) < 20_000  # manifest only: memmaps are reopened, not serialised
    clone = pickle.loads(payload)
    after = clone.lookup(torch.tensor([3, 47]), torch.tensor([1, 0]))
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_info_cli_reports_fingerprint_size_and_completeness(built, capsys):
    assert _cli(["cache", "info", str(built), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] and info["shards_sealed"] == info["shards_total"] == 3 and info["images_done"] == 48
    assert info["teacher"]["sha256"] == TEACHER_SHA and info["views"] == 2
    assert info["outputs"] == {"pooled": 96, "proj": 16}
    assert info["feature_bytes_per_image"] == 2 * (2 * (96 + 16) + 52)
    assert info["size_bytes"] > 48 * info["feature_bytes_per_image"]
    assert info["transform"]["spec"]["size"] == 20 and info["dataset"]["num_images"] == 48


def test_malformed_manifest_is_a_gate_error(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["transform"]["spec"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GateError, match="malformed"):
        FeatureCache.open(copy)
