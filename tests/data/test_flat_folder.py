"""A flat folder of images (no class folders) is unlabelled pre-training data, as STL-10's ``unlabeled`` split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillctl.data.datasets import UNLABELLED_CLASS, open_dataset
from distillctl.data.splits import labelled_splits
from distillctl.errors import InputError


def _images(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"img{index:03d}.png")


def test_flat_folder_is_one_unlabelled_class(tmp_path: Path) -> None:
    _images(tmp_path / "unlabelled", 5)
    (tmp_path / "unlabelled" / "README.txt").write_text("not an image")
    data = open_dataset(tmp_path / "unlabelled")
    assert len(data) == 5 and data.classes == [UNLABELLED_CLASS] and set(data.labels) == {0}
    assert [Path(p).name for p in data.paths] == [f"img{i:03d}.png" for i in range(5)]
    assert tuple(data.load_image(0).shape) == (3, 8, 8)
    assert [Path(p).name for p in data.faults.non_image_files] == ["README.txt"]


def test_class_folders_still_win_and_labels_are_unchanged(tmp_path: Path) -> None:
    _images(tmp_path / "data" / "a", 2)
    _images(tmp_path / "data" / "b", 3, seed=1)
    data = open_dataset(tmp_path / "data")
    assert data.classes == ["a", "b"] and data.labels == [0, 0, 1, 1, 1]


def test_flat_folder_cannot_label_an_evaluation_split(tmp_path: Path) -> None:
    _images(tmp_path / "flat", 3)
    _images(tmp_path / "val" / "cat", 2)
    with pytest.raises(InputError, match="do not exist in the train split"):
        labelled_splits(str(tmp_path / "flat"), str(tmp_path / "val"))


def test_empty_folder_is_still_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no class folders"):
        open_dataset(tmp_path / "empty")
