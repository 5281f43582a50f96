"""Datasets as lists of (image source, label) with deterministic order and a content manifest.

Images are returned as ``uint8`` tensors of shape (3, H, W); every augmentation is applied later
from explicit parameters (see :mod:`distillctl.data.views`), so that the same view can be replayed
bit-exactly for the feature cache and for exact resume.

Sources:
- ``/path/to/dir``: an ImageFolder (``<dir>/<class>/<image>``); extensions are matched case-insensitively;
  non-image files are listed and skipped, symlink loops are not followed, empty classes are reported.
  A folder with images but no class folders is read flat, as one class ``unlabelled`` (unlabelled
  pre-training data such as STL-10's ``unlabeled`` split).
- WebDataset tar shards (``shards/train-{000000..000009}.tar``, one ``.tar``, or a directory of ``.tar``
  files): see :mod:`distillctl.data.webdataset`; sample paths read ``<shard>::<member>``.
- ``builtin:digits``: scikit-learn's 8x8 handwritten digits (1 797 real labelled images, ships with
  scikit-learn). Deterministic split: a stratified 80/20 split with seed 0 (``train`` 1 437, ``test`` 360).
  Images are upsampled to 32x32 RGB (bilinear) so standard CNN students apply.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distillctl.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
BUILTIN_DATASETS = ("digits",)
VAL_DIR_NAMES = ("val", "test", "validation")


@dataclass
class DataFaults:
    """Files that were skipped while scanning or decoding (reported in the run)."""

    non_image_files: list[str] = field(default_factory=list)
    unreadable_images: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)


class ImageDataset(torch.utils.data.Dataset):
    """Indexable images + labels. ``__getitem__`` returns ``(uint8 image (3,H,W), label, index)``."""

    def __init__(self, name: str, classes: list[str], labels: list[int], paths: list[str] | None = None,
                 arrays: np.ndarray | None = None, root: str | None = None, faults: DataFaults | None = None) -> None:
        self.name = name
        self.classes = classes
        self.labels = labels
        self.paths = paths
        self.arrays = arrays  # (N, H, W, 3) uint8 for in-memory datasets
        self.root = root
        self.faults = faults or DataFaults()

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, index: int) -> torch.Tensor:
        """Decode image ``index`` to a uint8 (3, H, W) tensor (RGB)."""
        if self.arrays is not None:
            return torch.from_numpy(np.ascontiguousarray(self.arrays[index])).permute(2, 0, 1).contiguous()
        from PIL import Image

        path = self.paths[index]
        if _is_tar_member(path):
            from distillctl.data.webdataset import decode_image

            array = np.asarray(decode_image(path), dtype=np.uint8).copy()
        else:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
                array = np.asarray(rgb, dtype=np.uint8).copy()
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of image ``index`` without keeping the decoded pixels."""
        if self.arrays is not None:
            return int(self.arrays.shape[1]), int(self.arrays.shape[2])
        from PIL import Image

        if _is_tar_member(self.paths[index]):
            from distillctl.data.webdataset import decode_image

            width, height = decode_image(self.paths[index]).size
            return height, width
        with Image.open(self.paths[index]) as img:
            width, height = img.size
        return height, width

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.load_image(index), self.labels[index], index

    def manifest_hash(self) -> str:
        """sha256 over (relative path or row hash, size, label): identifies the data for caches and fingerprints.

        The root path as typed is not part of it, so ``./data`` and ``/abs/data`` give the same hash."""
        digest = hashlib.sha256()
        if self.arrays is not None:
            digest.update(self.name.encode())  # built-in data: the name says which split
            digest.update(hashlib.sha256(self.arrays.tobytes()).digest())
            digest.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        else:
            root = Path(self.root) if self.root else None
            for path, label in zip(self.paths, self.labels):
                rel = os.path.relpath(path, root) if root else path
                digest.update(f"{rel}\0{_file_size(path)}\0{label}\n".encode())
        return digest.hexdigest()

    def subset(self, indices: list[int] | np.ndarray, name: str | None = None) -> "ImageDataset":
        indices = [int(i) for i in indices]
        return ImageDataset(
            name=name or f"{self.name}[subset:{len(indices)}]",
            classes=self.classes,
            labels=[self.labels[i] for i in indices],
            paths=[self.paths[i] for i in indices] if self.paths is not None else None,
            arrays=self.arrays[indices] if self.arrays is not None else None,
            root=self.root,
            faults=self.faults,
        )


def _is_tar_member(path: str) -> bool:
    from distillctl.data.webdataset import TAR_SEP

    return TAR_SEP in path


def _file_size(path: str) -> int:
    if _is_tar_member(path):
        from distillctl.data.webdataset import member_size

        return member_size(path)
    return os.path.getsize(path)


def _scan_image_folder(root: Path) -> ImageDataset:
    if not root.exists():
        raise InputError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise InputError(f"data path is not a directory: {root}", hint="pass an ImageFolder directory (<dir>/<class>/<image>) or builtin:digits")
    faults = DataFaults()
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs and _loose_images(root):
        return _flat_folder(root, faults)
    if not class_dirs:
        raise InputError(f"no class folders in {root}", hint="expected <dir>/<class>/<image>; for a train/val layout pass the train folder")
    classes: list[str] = []
    paths: list[str] = []
    labels: list[int] = []
    resolved_root = root.resolve()
    for class_dir in class_dirs:
        if class_dir.is_symlink() and (class_dir.resolve() == resolved_root or class_dir.resolve() in resolved_root.parents):
            faults.non_image_files.append(f"{class_dir} (symlink loop to {class_dir.resolve()})")
            continue
        files: list[str] = []
        # followlinks=False: a symlink loop cannot make the walk recurse forever.
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
            dirnames.sort()
            for filename in sorted(filenames):
                full = os.path.join(dirpath, filename)
                if filename.startswith("."):
                    continue
                if filename.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(full):
                    files.append(full)
                else:
                    faults.non_image_files.append(full)
        if not files:
            faults.empty_classes.append(class_dir.name)
            continue
        label = len(classes)
        classes.append(class_dir.name)
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise InputError(f"no images found under {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return ImageDataset(name=str(root), classes=classes, labels=labels, paths=paths, root=str(root), faults=faults)


UNLABELLED_CLASS = "unlabelled"


def _loose_images(root: Path) -> list[str]:
    """Image files directly inside ``root`` (sorted), not in class folders."""
    return sorted(str(p) for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.lower().endswith(IMAGE_EXTENSIONS))


def _flat_folder(root: Path, faults: DataFaults) -> ImageDataset:
    """A flat folder of images (e.g. STL-10's unlabelled split): one class, ``unlabelled``, for self-supervised
    training; its labels mean nothing, so it cannot be a labelled evaluation split."""
    paths = _loose_images(root)
    faults.non_image_files.extend(sorted(str(p) for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                                         and not p.name.lower().endswith(IMAGE_EXTENSIONS)))
    return ImageDataset(name=str(root), classes=[UNLABELLED_CLASS], labels=[0] * len(paths), paths=paths,
                        root=str(root), faults=faults)


def _builtin_digits(split: str) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N,1,8,8) in [0,1]
    upsampled = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    pixels = (upsampled.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(indices, test_size=0.2, random_state=0, stratify=digits.target)
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return ImageDataset(
        name=f"builtin:digits/{split}",
        classes=[str(i) for i in range(10)],
        labels=[int(t) for t in digits.target[chosen]],
        arrays=np.ascontiguousarray(pixels[chosen]),
    )


def open_dataset(spec: str | Path, split: str = "train") -> ImageDataset:
    """Open ``builtin:<name>`` (``split`` = train|test) or an ImageFolder directory."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_DATASETS:
            from distillctl.errors import unknown_name

            raise unknown_name("built-in dataset", name, [f"builtin:{n}" for n in BUILTIN_DATASETS])
        if name == "digits":
            return _builtin_digits("test" if split in ("val", "test") else "train")
    from distillctl.data.webdataset import is_tar_source, open_webdataset

    if is_tar_source(spec):
        return open_webdataset(spec)
    return _scan_image_folder(Path(spec).expanduser())


def resolve_splits(data: str, val_data: str | None) -> tuple[str, str | None]:
    """Resolve the train and labelled-eval sources.

    ``builtin:x`` → its train/test split. A directory with ``train/`` and ``val|test|validation/`` →
    those. Otherwise ``data`` is the train folder and ``val_data`` (if given) the eval folder.
    """
    if data.startswith("builtin:"):
        return data, val_data or data  # builtin datasets carry their own split
    from distillctl.data.webdataset import is_tar_source

    if is_tar_source(data):
        return data, val_data
    root = Path(data).expanduser()
    if val_data is None and (root / "train").is_dir():
        for name in VAL_DIR_NAMES:
            if (root / name).is_dir():
                return str(root / "train"), str(root / name)
        return str(root / "train"), None
    return data, val_data
