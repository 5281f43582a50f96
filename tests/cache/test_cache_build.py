"""Building the cache: exact replay, targets equal to the online teacher, resume, disk check, bad rows."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cache_helpers import MEAN, STD, build_test_cache, make_teacher
from distillctl.cache import FeatureCache
from distillctl.cache import layout
from distillctl.data.views import ViewSpec, centre_box, normalize
from distillctl.errors import GateError, InputError, TrainingError

SPEC = ViewSpec(size=24, family="mocov2", scale=(0.3, 1.0))


class Recorder(nn.Module):
    """Wraps a backbone and keeps a copy of every input batch it sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs.append(images.detach().clone())
        return self.inner(images)


def _build(teacher, dataset, out: Path, **overrides) -> FeatureCache:
    return build_test_cache(teacher, dataset, out, **{"spec": SPEC, "views": 3, "outputs": {"pooled", "proj"},
                                                      "batch_size": 12, **overrides})


def test_replay_is_pixel_identical_to_the_teacher_input(image_folder, tmp_path):
    teacher = make_teacher()
    recorder = Recorder(teacher.backbone)
    teacher.backbone = recorder
    seen: list[tuple[np.ndarray, torch.Tensor]] = []
    cache = _build(teacher, image_folder, tmp_path / "c", channels_last=True,
                   on_batch=lambda info: seen.append((info.indices.copy(), recorder.inputs[-1])))
    assert sum(len(indices) for indices, _ in seen) == len(image_folder) == 40
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    photometric = 0
    for indices, batch in seen:
        assert batch.shape == (len(indices) * 3, 3, 24, 24)
        for position, index in enumerate(indices):
            image = image_folder.load_image(int(index))
            for k in range(3):
                replayed = cache.replay(image, int(index), k)
                teacher_input = batch[position * 3 + k]
                # the same normalised floats, and the same uint8 pixels after undoing the normalisation
                assert torch.equal(normalize(replayed, MEAN, STD), teacher_input)
                recovered = ((teacher_input * std + mean) * 255).round().to(torch.uint8)
                assert torch.equal(recovered, replayed)
                params = cache.view_params(int(index), k)
                assert (params.src_height, params.src_width) == tuple(image.shape[-2:])
                photometric += params.jitter or params.gray or params.blur_sigma > 0
                if k == 0:  # view 0 is the deterministic centre crop without photometric changes
                    box = centre_box(SPEC, *image.shape[-2:])
                    assert (params.top, params.left, params.height, params.width) == box
                    assert not (params.flip or params.jitter or params.gray or params.blur_sigma)
    assert photometric > 10  # mocov2 views really carry photometric parameters


def test_cached_targets_equal_online_teacher_outputs(image_folder, tmp_path):
    teacher = make_teacher()
    cache = _build(teacher, image_folder, tmp_path / "c")
    rng = np.random.default_rng(1)
    index = torch.from_numpy(rng.integers(0, len(image_folder), size=24))
    k = torch.from_numpy(rng.integers(0, 3, size=24))
    cached = cache.lookup(index, k)
    views = torch.stack([cache.replay(image_folder.load_image(int(i)), int(i), int(v)) for i, v in zip(index, k)])
    online = teacher.forward(normalize(views, MEAN, STD), {"pooled", "proj"})
    for name, dim in (("pooled", 96), ("proj", 16)):
        assert cached[name].dtype == torch.float32 and cached[name].shape == (24, dim)
        torch.testing.assert_close(cached[name], online[name], rtol=1e-3, atol=2e-3)
    # different views of the same image give different targets (the cache does not store one crop K times)
    pair = cache.lookup(torch.tensor([5, 5]), torch.tensor([1, 2]))["pooled"]
    assert not torch.allclose(pair[0], pair[1])


def test_lookup_across_shards_and_bad_indices(digits, tmp_path):
    cache = _build(make_teacher(), digits, tmp_path / "c", shard_size=10)
    assert cache.num_shards == 5 and cache.num_images == 48
    index = torch.tensor([47, 0, 10, 9, 33, 47])
    k = torch.tensor([2, 0, 1, 2, 0, 1])
    batch = cache.lookup(index, k)["pooled"]
    for row, (i, v) in enumerate(zip(index.tolist(), k.tolist())):
        shard, local = divmod(i, 10)
        stored = np.load(tmp_path / "c" / "pooled" / f"shard_{shard:05d}.npy")[local * 3 + v]
        assert torch.equal(batch[row], torch.from_numpy(stored).float())
    with pytest.raises(InputError):
        cache.lookup(torch.tensor([48]), torch.tensor([0]))
    with pytest.raises(InputError):
        cache.lookup(torch.tensor([0]), torch.tensor([3]))


def _store_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for sub in ("params", "pooled", "proj") for p in (root / sub).glob("*.npy"))
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _shard_entries(root: Path) -> list[dict]:
    return layout.read_json(root / "manifest.json")["shards"]


@pytest.mark.parametrize("flush_seconds", [0.0, 1e9])
def test_interrupted_build_resumes_to_an_identical_store(digits, tmp_path, flush_seconds):
    reference = _build(make_teacher(), digits, tmp_path / "ref", batch_size=6)  # 2 images per batch

    class Interrupt(Exception):
        pass

    def stop_after(batches: int):
        count = {"n": 0}

        def hook(info):
            count["n"] += 1
            if count["n"] == batches:
                raise Interrupt

        return hook

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):  # mid-shard 1 (shards hold 16 images = 8 batches)
        _build(make_teacher(), digits, out, batch_size=6, on_batch=stop_after(11), flush_seconds=flush_seconds)
    manifest = layout.read_json(out / "manifest.json")
    assert not manifest["complete"]
    assert [s["status"] for s in manifest["shards"]] == ["sealed", "partial", "pending"]
    with pytest.raises(GateError, match="incomplete"):
        FeatureCache.open(out)
    done = np.unpackbits(np.fromfile(out / "done" / "shard_00001.bits", dtype=np.uint8), count=16)
    assert done.sum() == 6  # 3 batches of shard 1 were flushed before the interruption (incl. the failing one)
    resumed = _build(make_teacher(), digits, out, batch_size=6, num_workers=2)
    assert _store_bytes(out) == _store_bytes(tmp_path / "ref")
    assert _shard_entries(out) == _shard_entries(tmp_path / "ref")
    assert resumed.manifest["build"]["images_built"] == 48 - 16 - 6
    assert reference.manifest["build"]["images_built"] == 48
    assert not list(out.rglob("*.partial"))


def test_complete_cache_is_reused_and_other_inputs_are_refused(digits, tmp_path):
    _build(make_teacher(), digits, tmp_path / "c")
    teacher = make_teacher()
    teacher.backbone.forward = lambda images: (_ for _ in ()).throw(AssertionError("teacher must not run"))
    reused = _build(teacher, digits, tmp_path / "c", outputs={"pooled"})  # a subset of the stored outputs
    assert reused.outputs == {"pooled": 96, "proj": 16}
    with pytest.raises(GateError, match="view seed 0 \\(cache\\) vs 7") as err:
        _build(make_teacher(), digits, tmp_path / "c", seed=7)
    assert err.value.exit_code == 3
    with pytest.raises(GateError, match="teacher sha256"):
        _build(make_teacher(sha256="cd" * 32), digits, tmp_path / "c")


def test_disk_space_check_refuses_before_writing(digits, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5000, 5000))
    out = tmp_path / "deep" / "cache"
    with pytest.raises(InputError, match=r"needs about .* free") as err:
        _build(make_teacher(), digits, out)
    assert err.value.exit_code == 2
    assert "(5,000 bytes) free" in err.value.message and "48 images x 3 views x 276 B" in err.value.message
    assert not (tmp_path / "deep").exists()


class _Broken(nn.Module):
    def __init__(self, inner: nn.Module, value: float, bad_image_row: int) -> None:
        super().__init__()
        self.inner, self.value, self.calls, self.bad_image_row = inner, value, 0, bad_image_row

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.inner(images)
        self.calls += 1
        if self.calls == 3:  # the probe, then the first batch are fine
            out = out.clone()
            out[self.bad_image_row] = self.value
        return out


@pytest.mark.parametrize("value, what", [(float("nan"), "non-finite"), (0.0, "all-zero"), (1e6, "non-finite")])
def test_bad_teacher_rows_are_refused(digits, tmp_path, value, what):
    teacher = make_teacher()
    teacher.backbone = _Broken(teacher.backbone, value, bad_image_row=4)  # 1e6 overflows fp16 to inf
    with pytest.raises(TrainingError, match=what) as err:
        _build(teacher, digits, tmp_path / "c", outputs={"pooled"}, batch_size=6, flush_seconds=0.0)
    assert "images [3]" in err.value.message  # second batch = images 2, 3; rows are image-major → row 4 is image 3
    manifest = layout.read_json(tmp_path / "c" / "manifest.json")
    assert not manifest["complete"]
    assert not (tmp_path / "c" / "done" / "shard_00000.seal.json").exists()


def test_crash_between_commit_record_and_renames_is_finished_on_resume(digits, tmp_path):
    out = tmp_path / "c"
    _build(make_teacher(), digits, out)
    reference = _store_bytes(out)
    # as if killed right after shard 1's commit record: its files still carry the .partial name
    for sub in ("params", "proj"):
        final = out / sub / "shard_00001.npy"
        final.rename(layout.partial(final))
    # and shard 2's commit record lost its files entirely (deleted by hand): it must be rebuilt
    for sub in ("params", "pooled", "proj"):
        (out / sub / "shard_00002.npy").unlink()
    manifest = layout.read_json(out / "manifest.json")
    manifest["complete"] = False
    layout.atomic_write_json(out / "manifest.json", manifest)
    built: list[int] = []
    _build(make_teacher(), digits, out, on_batch=lambda info: built.append(info.shard))
    assert set(built) == {2}  # shard 1 needed only its renames; shard 2 was recomputed
    assert _store_bytes(out) == reference
    assert FeatureCache.open(out, verify=True).is_complete()


def test_progress_prints_plain_lines_with_rate_and_eta(digits, tmp_path, capsys):
    _build(make_teacher(), digits, tmp_path / "c", progress=True)
    err = capsys.readouterr().err
    assert "cache build: 48/48 images (100.0%)" in err and "img/s, ETA 0:00:00" in err
