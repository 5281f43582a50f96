"""One shard under construction: partial memmaps, the per-image done bitmap, and sealing.

Crash safety comes from the order of writes. Rows are written into ``*.npy.partial`` memmaps; every
flush syncs the memmaps *before* the done bitmap is atomically replaced, so a set bit always means the
rows are on disk. Sealing checks the values, fsyncs and hashes the partials, writes the commit record
(``done/shard_XXXXX.seal.json``) and only then renames the partials. After a kill, a shard with a
commit record only needs its renames finished; a shard without one continues from its bitmap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from distillctl.cache import layout
from distillctl.cache.store import _check_params, _count_bad_rows
from distillctl.data.views import PARAMS_DTYPE
from distillctl.errors import TrainingError


@dataclass(frozen=True)
class ShardPlan:
    shard: int
    start: int  # first image index
    stop: int  # one past the last image index
    views: int

    @property
    def images(self) -> int:
        return self.stop - self.start

    @property
    def rows(self) -> int:
        return self.images * self.views


def finish_sealed(root: Path, plan: ShardPlan, names: list[str]) -> dict | None:
    """The commit record of a sealed shard (completing renames a kill interrupted), or None if not sealed.

    A commit record whose files are gone (deleted by hand) is dropped so that the shard is rebuilt.
    """
    seal = layout.seal_file(root, plan.shard)
    if not seal.is_file():
        for name in names:  # finals without a commit record can only be left-overs: rebuild them
            layout.data_file(root, name, plan.shard).unlink(missing_ok=True)
        return None
    record = layout.read_json(seal)
    complete = True
    for name in names:
        final = layout.data_file(root, name, plan.shard)
        pending = layout.partial(final)
        if not final.is_file() and pending.is_file():
            os.replace(pending, final)
            layout.fsync_dir(final.parent)
        complete = complete and final.is_file() and name in record.get("sha256", {})
    if not complete:
        seal.unlink()
        layout.bitmap_file(root, plan.shard).unlink(missing_ok=True)
        for name in names:
            layout.data_file(root, name, plan.shard).unlink(missing_ok=True)
        return None
    return record


class ShardWriter:
    """Writes rows of one shard and seals it; reopens a partial shard where a previous build stopped."""

    def __init__(self, root: Path, plan: ShardPlan, dims: dict[str, int]) -> None:
        self.root = root
        self.plan = plan
        self.dims = dims
        self.files = {name: layout.data_file(root, name, plan.shard) for name in ("params", *dims)}
        self.bitmap_path = layout.bitmap_file(root, plan.shard)
        shapes = {"params": ((plan.rows,), PARAMS_DTYPE)}
        shapes.update({name: ((plan.rows, dim), np.dtype(np.float16)) for name, dim in dims.items()})
        self.done = self._load_bitmap()
        resumable = self.done is not None and all(self._partial_matches(name, *shapes[name]) for name in self.files)
        if not resumable:
            self.done = np.zeros(plan.images, dtype=bool)
        self.arrays: dict[str, np.ndarray] = {}
        for name, file in self.files.items():
            file.parent.mkdir(parents=True, exist_ok=True)
            shape, dtype = shapes[name]
            mode = "r+" if resumable else "w+"
            self.arrays[name] = open_memmap(layout.partial(file), mode=mode, dtype=dtype, shape=None if resumable else shape)
        self.bitmap_path.parent.mkdir(parents=True, exist_ok=True)

    def _load_bitmap(self) -> np.ndarray | None:
        if not self.bitmap_path.is_file():
            return None
        packed = np.fromfile(self.bitmap_path, dtype=np.uint8)
        if packed.size != (self.plan.images + 7) // 8:
            return None
        return np.unpackbits(packed, count=self.plan.images).astype(bool)

    def _partial_matches(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> bool:
        path = layout.partial(self.files[name])
        if not path.is_file():
            return False
        try:
            existing = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return False
        return existing.shape == shape and existing.dtype == dtype

    @property
    def images_done(self) -> int:
        return int(self.done.sum())

    def pending_chunks(self, images_per_batch: int) -> list[list[int]]:
        """Batches of pending image indices on a fixed grid, so a resumed build batches exactly as a fresh one."""
        chunks = []
        for offset in range(0, self.plan.images, images_per_batch):
            local = [i for i in range(offset, min(self.plan.images, offset + images_per_batch)) if not self.done[i]]
            if local:
                chunks.append([self.plan.start + i for i in local])
        return chunks

    def write(self, indices: np.ndarray, records: np.ndarray, features: dict[str, np.ndarray]) -> None:
        """Store the K views of each image in ``indices`` (rows ordered image-major, view-minor)."""
        local = indices - self.plan.start
        views = self.plan.views
        rows = (local[:, None] * views + np.arange(views)[None, :]).reshape(-1)
        self.arrays["params"][rows] = records
        for name, values in features.items():
            self.arrays[name][rows] = values
        self.done[local] = True

    def flush(self) -> None:
        """Sync rows first, then publish the bitmap: a set bit always points at rows already on disk."""
        for array in self.arrays.values():
            array.flush()
        layout.atomic_write_bytes(self.bitmap_path, np.packbits(self.done).tobytes())

    def close(self) -> None:
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()

    def seal(self) -> dict:
        """Check, hash and commit the shard. Refuses (TrainingError) non-finite values or all-zero rows."""
        self.flush()
        self.close()
        if not self.done.all():
            raise TrainingError(f"shard {self.plan.shard}: {int((~self.done).sum())} images were not written")
        record: dict = {"id": self.plan.shard, "start": self.plan.start, "stop": self.plan.stop, "rows": self.plan.rows,
                        "status": "sealed", "sha256": {}, "n_nonfinite": {}, "n_zero_rows": {}, "norm_mean": {},
                        "norm_std": {}}
        params = np.load(layout.partial(self.files["params"]), mmap_mode="r")
        if (bad := _check_params(params)):
            raise TrainingError(f"shard {self.plan.shard}: {bad} stored crop boxes fall outside their image")
        for name in self.dims:
            values = np.load(layout.partial(self.files[name]), mmap_mode="r")
            nonfinite, zero_rows, norms = _count_bad_rows(values)
            if nonfinite or zero_rows:
                raise TrainingError(f"refusing to seal shard {self.plan.shard}: {name} has {nonfinite} non-finite "
                                    f"values and {zero_rows} all-zero rows",
                                    hint="check the teacher weights; with --amp fp16 try bf16 or none")
            record["n_nonfinite"][name] = nonfinite
            record["n_zero_rows"][name] = zero_rows
            record["norm_mean"][name] = float(norms.mean())
            record["norm_std"][name] = float(norms.std())
        for name, file in self.files.items():
            layout.fsync_path(layout.partial(file))
            record["sha256"][name] = layout.sha256_file(layout.partial(file))
        layout.atomic_write_json(layout.seal_file(self.root, self.plan.shard), record)
        for file in self.files.values():
            os.replace(layout.partial(file), file)
            layout.fsync_dir(file.parent)
        return record
