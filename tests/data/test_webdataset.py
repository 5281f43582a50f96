"""WebDataset tar shards: brace patterns, samples (image + .cls), disjoint rank/worker splits, resumable
order, and a short training run reading the shards."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from distillctl.data.datasets import open_dataset
from distillctl.data.views import ViewSpec
from distillctl.data.webdataset import expand_braces, write_shards
from distillctl.errors import InputError
from distillctl.train.data import EpochBatchSampler, ViewDataset, collate_views
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    digits = open_dataset("builtin:digits").subset(range(96))
    out = tmp_path_factory.mktemp("shards") / "wds"
    write_shards(digits.arrays, digits.labels, out, per_shard=24)
    return out, digits


def test_brace_expansion():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}/s-{8..10}.tar") == ["x/s-8.tar", "x/s-9.tar", "x/s-10.tar", "y/s-8.tar", "y/s-9.tar",
                                                   "y/s-10.tar"]
    with pytest.raises(InputError, match="bad brace range"):
        expand_braces("s-{a..c}.tar")


def test_pattern_and_directory_give_the_same_samples(shards):
    out, digits = shards
    by_pattern = open_dataset(str(out / "train-{000000..000003}.tar"))
    by_directory = open_dataset(str(out))
    assert by_pattern.paths == by_directory.paths and len(by_pattern) == 96
    assert by_pattern.labels == digits.labels
    assert by_pattern.manifest_hash() == by_directory.manifest_hash()
    for index in (0, 25, 95):  # PNG is lossless: the pixels come back exactly
        assert torch.equal(by_pattern.load_image(index), digits.load_image(index))
    with pytest.raises(InputError, match="tar shard"):
        open_dataset(str(out / "train-{000000..000004}.tar"))


def test_ranks_and_workers_split_without_duplicates_and_resume_skips(shards):
    out, _ = shards
    dataset = open_dataset(str(out / "train-{000000..000003}.tar"))
    views = ViewDataset(dataset, [ViewSpec(size=16, family="weak")], seed=3, epoch=1)
    seen = []
    for rank in (0, 1):
        sampler = EpochBatchSampler(len(dataset), 32, seed=3, epoch=1, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(views, batch_sampler=sampler, num_workers=2, collate_fn=collate_views)
        for batch, bad in loader:
            assert not bad
            seen.extend(batch[2].tolist())
    assert sorted(seen) == list(range(96))  # 3 global batches of 32 cover the epoch exactly once
    full = list(EpochBatchSampler(len(dataset), 32, seed=3, epoch=1))
    resumed = list(EpochBatchSampler(len(dataset), 32, seed=3, epoch=1, start_step=2))
    assert resumed == full[2:]  # a resumed epoch skips the batches before the checkpoint unread


def test_samples_without_label_are_faults(tmp_path):
    path = tmp_path / "one.tar"
    with tarfile.open(path, "w") as archive:
        for name, payload in (("a.png", _png()), ("a.cls", b"3"), ("b.png", _png()), ("c.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    dataset = open_dataset(str(path))
    assert len(dataset) == 1 and dataset.labels == [3] and dataset.classes == ["0", "1", "2", "3"]
    assert len(dataset.faults.non_image_files) == 2


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_training_run_on_shards(shards, tmp_path, tiny_teacher_file):
    out, _ = shards
    result = run_cli("run", "--teacher", str(tiny_teacher_file), "--teacher-arch", "resnet18", "--student", "tiny-cnn",
                     "--method", "simreg", "--data", str(out / "train-{000000..000002}.tar"),
                     "--val-data", str(out / "train-000003.tar"), "--image-size", "16", "--epochs", "1",
                     "--batch-size", "24", "--workers", "2", "--teacher-mode", "online", "--out", str(tmp_path / "run"),
                     "--set", "data.crop_pct=1.0", "--set", "export.enabled=false", "--set", "eval.knn_k=[5]", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["train"]["steps"] == 3 and summary["data"]["images"] == 72 and summary["data"]["eval_images"] == 24
    assert summary["student"]["knn_top1"] is not None
