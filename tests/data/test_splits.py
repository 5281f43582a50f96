"""One labelled-split resolver for run, eval and export: evaluation labels follow the train split's class names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillctl.data.splits import labelled_splits, open_splits
from distillctl.errors import InputError


def _folder(root: Path, classes: dict[str, int]) -> Path:
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def data_without_class_b(tmp_path) -> Path:
    """train/ has classes a, b, c; val/ lacks b, so its own folder order would label c as 1 (= b)."""
    _folder(tmp_path / "data" / "train", {"a": 2, "b": 2, "c": 2})
    _folder(tmp_path / "data" / "val", {"a": 1, "c": 3})
    return tmp_path / "data"


def test_run_and_eval_resolver_aligns_a_val_split_missing_a_class(data_without_class_b):
    splits = labelled_splits(str(data_without_class_b))
    assert splits.train.classes == ["a", "b", "c"] and splits.test.classes == ["a", "b", "c"]
    assert sorted(splits.test.labels) == [0, 2, 2, 2]


def test_export_accuracy_gate_compares_correctly_labelled_splits(data_without_class_b):
    from distillctl.export.api import _Splits

    splits = _Splits(str(data_without_class_b / "train"), str(data_without_class_b / "val"), 1.0)
    assert sorted(splits.test.labels) == [0, 2, 2, 2]  # was [0, 1, 1, 1]: c mislabelled as b
    assert splits.holdout is None


def test_a_val_class_unknown_to_train_is_refused(tmp_path):
    _folder(tmp_path / "train", {"a": 1, "b": 1})
    _folder(tmp_path / "val", {"a": 1, "z": 1})
    with pytest.raises(InputError, match="evaluation classes do not exist in the train split"):
        open_splits(str(tmp_path / "train"), str(tmp_path / "val"))


def test_builtin_split_needs_no_alignment():
    splits = labelled_splits("builtin:digits")
    assert splits.test_source == "builtin:digits" and splits.test.classes == splits.train.classes
