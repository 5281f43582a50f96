"""Data faults in an ImageFolder: truncated JPEGs are skipped (substituted), counted and listed; above
data.max_bad_fraction the run stops with exit 2. Empty classes, non-image files, symlink loops,
mixed-case extensions and paths with spaces and unicode are handled."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillctl.data.datasets import open_dataset
from distillctl.data.views import ViewSpec
from distillctl.train.data import EpochBatchSampler, ViewDataset, collate_views
from tests.conftest import run_cli

GOOD_PER_CLASS = 23  # 2 x 23 good + 2 truncated = 48 = 3 global batches of 16: every image is met


def _jpeg(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_faulty_folder(root: Path) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    classes = {"cät with space": root / "cät with space", "Ünïcode": root / "Ünïcode"}
    written: dict[str, list[Path]] = {"truncated": [], "good": []}
    for index, directory in enumerate(classes.values()):
        directory.mkdir(parents=True)
        for i in range(GOOD_PER_CLASS):
            suffix = (".JPG", ".Jpeg", ".jpg")[i % 3]  # mixed-case extensions count as images
            path = directory / f"img {i:02d}{suffix}"
            path.write_bytes(_jpeg(rng))
            written["good"].append(path)
        truncated = directory / f"broken {index}.jpg"
        truncated.write_bytes(_jpeg(rng)[:300])  # header intact, scan data cut: decoding fails
        written["truncated"].append(truncated)
    (root / "empty class").mkdir()
    (root / "empty class" / "readme.txt").write_text("no images here")
    (classes["Ünïcode"] / "notes.md").write_text("not an image")
    os.symlink("loop.jpg", classes["Ünïcode"] / "loop.jpg")  # a symlink pointing at itself
    os.symlink("..", classes["Ünïcode"] / "parent")  # a directory loop inside a class
    os.symlink(".", root / "self")  # a class folder that is the root itself
    return written


def test_scan_reports_faults_and_keeps_real_images(tmp_path):
    written = make_faulty_folder(tmp_path / "data")
    dataset = open_dataset(tmp_path / "data")
    assert dataset.classes == ["cät with space", "Ünïcode"]
    assert len(dataset) == 2 * GOOD_PER_CLASS + 2
    assert dataset.faults.empty_classes == ["empty class"]
    skipped = " ".join(dataset.faults.non_image_files)
    assert "notes.md" in skipped and "loop.jpg" in skipped and "readme.txt" in skipped and "symlink loop" in skipped
    assert sorted(map(str, written["truncated"] + written["good"])) == sorted(dataset.paths)


def test_unreadable_images_are_substituted_and_reported(tmp_path):
    written = make_faulty_folder(tmp_path / "data")
    dataset = open_dataset(tmp_path / "data")
    views = ViewDataset(dataset, [ViewSpec(size=16, family="weak")], seed=0, epoch=0)
    broken = dataset.paths.index(str(written["truncated"][0]))
    item = views[broken]
    assert item[0] is not None and item[2] != broken  # a keyed substitute keeps the batch full
    assert item[-1][0][0] == str(written["truncated"][0]) and "OSError" in item[-1][0][1]
    assert views[broken][2] == item[2]  # deterministic (exact resume)

    sampler = EpochBatchSampler(len(dataset), 16, seed=0, epoch=0)
    seen_bad = set()
    for rows in sampler:
        batch, bad = collate_views([views[i] for i in rows])
        assert batch[2].shape[0] == 16
        seen_bad.update(path for path, _ in bad)
    assert seen_bad == {str(p) for p in written["truncated"]}


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--student", "tiny-cnn", "--method", "simreg", "--data", str(data),
            "--image-size", "16", "--epochs", "1", "--batch-size", "16", "--teacher-mode", "online", "--out", str(out),
            "--set", "data.crop_pct=1.0", "--set", "export.enabled=false", *extra]


@pytest.fixture(scope="module")
def faulty_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faulty") / "dätä set"
    make_faulty_folder(root)
    return root


@pytest.mark.slow
def test_run_lists_bad_images_and_stops_above_the_fraction(faulty_folder, tmp_path, tiny_teacher_file):
    teacher = ["--teacher", str(tiny_teacher_file), "--teacher-arch", "resnet18"]
    ok = run_cli(*_args(faulty_folder, tmp_path / "ok", "--set", "data.max_bad_fraction=0.1"), *teacher, "--json")
    assert ok.returncode == 0, ok.stderr[-3000:]
    summary = json.loads(ok.stdout)
    listed = (tmp_path / "ok" / "bad_images.txt").read_text().splitlines()
    assert len(listed) == 2 and all("broken" in line and "OSError" in line for line in listed)
    faults = summary["data"]["faults"]
    assert faults["unreadable_images"] == 2 and faults["unreadable_list"] == "bad_images.txt"
    assert faults["empty_classes"] == ["empty class"] and faults["non_image_files"] >= 4
    assert summary["train"]["steps"] == 3 and summary["train"]["images_seen"] == 48
    assert "warning: data: skipped" in ok.stderr and "empty class folder(s) ignored: empty class" in ok.stderr

    strict = run_cli(*_args(faulty_folder, tmp_path / "strict", "--set", "data.max_bad_fraction=0.01"), *teacher)
    assert strict.returncode == 2, strict.stderr[-3000:]
    assert "train: 2 unreadable images (> 1.0% of 48); first:" in strict.stderr and "broken" in strict.stderr
    assert "max_bad_fraction" in strict.stderr and "Traceback" not in strict.stderr
    assert not (tmp_path / "strict" / "student").exists()
