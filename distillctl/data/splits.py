"""Labelled splits: the one resolver that ``run`` (its eval stage), ``eval`` and ``export`` (its INT8 accuracy gate)
share, so all three label the evaluation split the same way.

Two ImageFolders index their own sorted class lists: a val folder that lacks one class would shift every later
label by one, and kNN accuracy (or an INT8 accuracy budget) would silently compare mislabelled splits. The
evaluation split is therefore always re-labelled by class *name* against the train split (:func:`align_classes`);
a val class the train split does not have is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from distillctl.data.datasets import ImageDataset, open_dataset, resolve_splits
from distillctl.errors import InputError


@dataclass
class LabelledSplits:
    """The train (kNN bank / probe training) and evaluation datasets, with the sources they were opened from."""

    train: ImageDataset
    test: ImageDataset | None
    train_source: str
    test_source: str | None


def align_classes(train: ImageDataset, val: ImageDataset) -> ImageDataset:
    """``val`` with labels re-indexed to ``train``'s classes (matched by name)."""
    if list(val.classes) == list(train.classes):
        return val
    index = {name: i for i, name in enumerate(train.classes)}
    unknown = [name for name in val.classes if name not in index]
    if unknown:
        raise InputError(f"{len(unknown)} evaluation classes do not exist in the train split (e.g. {', '.join(unknown[:3])})",
                         hint="train and val folders must use the same class folder names")
    return ImageDataset(name=val.name, classes=list(train.classes), labels=[index[val.classes[label]] for label in val.labels],
                        paths=val.paths, arrays=val.arrays, root=val.root, faults=val.faults)


def open_splits(train_source: str, test_source: str | None) -> LabelledSplits:
    """Open already-resolved sources (e.g. recorded in a run); the evaluation split is aligned to train's classes."""
    train = open_dataset(train_source, "train")
    test = align_classes(train, open_dataset(test_source, "test")) if test_source else None
    return LabelledSplits(train, test, train_source, test_source)


def labelled_splits(data: str, val_data: str | None = None) -> LabelledSplits:
    """``--data`` / ``--val-data`` as typed: a ``train/`` + ``val/`` layout or a builtin's own split is found
    (:func:`distillctl.data.datasets.resolve_splits`), then both are opened and aligned (:func:`open_splits`)."""
    return open_splits(*resolve_splits(data, val_data))
