"""Decode-once store: later epochs replay views from kept pixels (no second decode), views identical to decoding
afresh, the byte budget respected, unreadable images never kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distillctl.data.datasets import open_dataset
from distillctl.data.views import ViewSpec
from distillctl.train.data import DecodedImages, ViewDataset


def _folder(root: Path, count: int = 6, broken: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        cls = root / f"c{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        if i == broken:
            (cls / f"{i}.jpg").write_bytes(b"not a jpeg")
        else:
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(cls / f"{i}.jpg")
    return root


class Counting:
    """Wraps a dataset; counts decodes."""

    def __init__(self, base) -> None:
        self.base, self.calls = base, 0

    def __getattr__(self, name):
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.base)

    def load_image(self, index: int) -> torch.Tensor:
        self.calls += 1
        return self.base.load_image(index)


def _items(dataset, decoded, epoch: int) -> list:
    specs = [ViewSpec(size=8, family="simclr"), ViewSpec(size=8, family="weak")]
    views = ViewDataset(dataset, specs, seed=3, epoch=epoch, decoded=decoded)
    return [views[i] for i in range(len(views))]


def test_second_epoch_replays_from_kept_pixels_identically(tmp_path: Path) -> None:
    counting = Counting(open_dataset(_folder(tmp_path / "d")))
    decoded = DecodedImages(1 << 20)
    plain = [_items(open_dataset(tmp_path / "d"), None, epoch) for epoch in (0, 1)]
    kept = [_items(counting, decoded, epoch) for epoch in (0, 1)]
    assert counting.calls == 6  # epoch 1 decoded nothing
    assert decoded.used == 6 * 3 * 12 * 10
    for epoch in (0, 1):
        for a, b in zip(plain[epoch], kept[epoch]):
            assert all(x.equal(y) for x, y in zip(a[0], b[0]))
            assert a[1:3] == b[1:3] and a[3].equal(b[3]) and a[4].equal(b[4])


def test_budget_and_unreadable_images_are_not_kept(tmp_path: Path) -> None:
    counting = Counting(open_dataset(_folder(tmp_path / "d", broken=2)))
    small = DecodedImages(2 * 3 * 12 * 10)  # room for two images
    _items(counting, small, 0)
    assert len(small.pixels) == 2 and small.used == 2 * 3 * 12 * 10
    decoded = DecodedImages(1 << 20)
    first = _items(counting, decoded, 0)
    bad_index = [Path(p).name for p in counting.paths].index("2.jpg")
    assert bad_index not in decoded.pixels and len(decoded.pixels) == 5
    again = _items(counting, decoded, 1)
    broken = [item for item in first + again if item[-1]]
    assert len(broken) == 2  # the unreadable file is reported in both epochs
