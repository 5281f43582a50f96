"""Run the frozen teacher once over K stored views per image and write a resumable, sharded feature cache.

View 0 of every image is the deterministic centre crop; views 1..K-1 are drawn from ``spec`` with
``sample_rng(seed, 0, index, k)``. The parameters are stored, and the teacher sees exactly the pixels
that replay produces (``apply_view_uint8`` + ``normalize``: the same functions the trainer calls).
With ``turns`` T > 1 (methods that show rotated copies: DLKD) each of the K crops is also stored rotated by
1..T-1 quarter turns: K·T rows per image, row j = crop j // T at j % T quarter turns.
Under ``torch.distributed`` rank r builds shards r, r+W, ...; rank 0 writes the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from distillctl.cache import layout
from distillctl.cache.progress import BuildProgress
from distillctl.cache.shard import ShardPlan, ShardWriter, finish_sealed
from distillctl.cache.store import FeatureCache, centre_spec, manifest_differences, read_manifest, rotated
from distillctl.data.bad_images import DEFAULT_MAX_FRACTION, BadImages, load_or_substitute
from distillctl.data.datasets import ImageDataset
from distillctl.data.views import (PARAMS_DTYPE, ViewParams, ViewSpec, apply_view_uint8, normalize,
                                   params_to_record, sample_rng, sample_view, spec_dict)
from distillctl.errors import GateError, InputError, TrainingError, UsageError
from distillctl.teachers.base import Teacher
from distillctl.train import distributed

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NPY_HEADER_BYTES = 128
LAYOUT_NAMES = {layout.MANIFEST, "index", "params", "done", "artifacts", "bad_images.txt", *layout.OUTPUT_KINDS}


@dataclass(frozen=True)
class BatchInfo:
    """Passed to ``on_batch`` after each teacher batch is written (progress hooks, tests)."""

    shard: int
    indices: np.ndarray
    images_done: int
    images_total: int


def cache_fingerprint(teacher_sha256: str, outputs: Iterable[str], dataset_hash: str, spec: ViewSpec, views: int,
                      mean: Iterable[float], std: Iterable[float], seed: int, taps: Iterable[str] = (),
                      turns: int = 1) -> str:
    """sha256 of everything that determines the cached values: a different teacher/data/transform → another cache.
    A cache without teacher taps or rotations keeps the fingerprint it had before those could be cached."""
    key = {"schema": layout.SCHEMA, "teacher_sha256": teacher_sha256, "outputs": sorted(outputs),
           "dataset": dataset_hash, "spec": spec_dict(spec), "views": int(views),
           "mean": [round(float(v), 8) for v in mean], "std": [round(float(v), 8) for v in std], "seed": int(seed)}
    if taps:
        key["taps"] = sorted(taps)
    if turns > 1:
        key["turns"] = int(turns)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def stored_view(spec: ViewSpec, seed: int, index: int, k: int, height: int, width: int) -> ViewParams:
    """The parameters of stored view ``k`` of image ``index`` (view 0: centre crop)."""
    if k == 0:
        return sample_view(centre_spec(spec), height, width, None)
    return sample_view(spec, height, width, sample_rng(seed, 0, index, k))


class ViewProducer(torch.utils.data.Dataset):
    """Decode an image and produce its K·T uint8 views + parameter records (runs in DataLoader workers)."""

    def __init__(self, dataset: ImageDataset, spec: ViewSpec, views: int, seed: int, turns: int = 1) -> None:
        self.dataset, self.spec, self.views, self.seed, self.turns = dataset, spec, views, seed, turns

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, np.ndarray | None, list[tuple[str, str]]]:
        # an unreadable image gets the rows of its keyed substitute, as training substitutes it (data/bad_images.py):
        # the trainer never reads the bad image's rows, and the cache stays complete and index-aligned
        _, image, bad = load_or_substitute(self.dataset, index)
        if image is None:
            return index, None, None, bad
        height, width = int(image.shape[-2]), int(image.shape[-1])
        records = np.zeros(self.views * self.turns, dtype=PARAMS_DTYPE)
        pixels = []
        for k in range(self.views):
            params = stored_view(self.spec, self.seed, index, k, height, width)
            base = centre_spec(self.spec) if k == 0 else self.spec
            for turns in range(self.turns):  # the same crop at each rotation: one parameter record per row
                records[k * self.turns + turns] = params_to_record(params)
                pixels.append(apply_view_uint8(image, params, rotated(base, turns)))
        return index, torch.stack(pixels), records, bad


def _collate(items: list) -> tuple[np.ndarray, torch.Tensor, np.ndarray, list[tuple[str, str]]]:
    """Stack the items' views; also the unreadable files met. An item none of whose substitutes could be
    read stops the build (a whole run of unreadable files is not an isolated fault)."""
    bad = [entry for item in items for entry in item[3]]
    for index, pixels, _, entries in items:
        if pixels is None:
            raise InputError(f"cache: image {index} and its {len(entries) - 1} substitutes are unreadable; "
                             f"first: {entries[0][0]}: {entries[0][1]}", hint="check the data")
    indices = np.array([item[0] for item in items], dtype=np.int64)
    return indices, torch.cat([item[1] for item in items]), np.concatenate([item[2] for item in items]), bad


def estimate_bytes(num_images: int, views: int, dims: dict[str, int], shard_size: int) -> int:
    """Bytes the finished cache occupies: fp16 rows + 52-byte parameter rows + headers and bitmaps."""
    shards = -(-num_images // shard_size)
    rows = num_images * views
    return (rows * (2 * sum(dims.values()) + PARAMS_DTYPE.itemsize) + shards * (len(dims) + 1) * NPY_HEADER_BYTES
            + num_images // 8 + shards * 4096)


def _human(num: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(num) < 1000 or unit == "TB":
            return f"{num:.1f} {unit}" if unit != "B" else f"{int(num)} B"
        num /= 1000
    return f"{num:.1f} TB"


def check_disk_space(root: Path, needed: int, detail: str = "") -> None:
    """InputError (exit 2) before anything is written when the filesystem cannot hold the cache."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise InputError(f"not enough disk space for the feature cache at {root}: needs about {_human(needed)} "
                         f"({needed:,} bytes{detail}), {_human(free)} ({free:,} bytes) free on {probe}",
                         hint="free space, lower --views, cache fewer --outputs, or choose another --out")


def _header(teacher: Teacher, dataset: ImageDataset, dataset_hash: str, fingerprint: str, spec: ViewSpec, views: int,
            dims: dict[str, int], mean, std, seed: int, shard_size: int,
            tap_shapes: dict[str, tuple[int, ...]] | None = None, turns: int = 1) -> dict:
    """The manifest's fixed part; ``views`` is rows per image (K crops x ``turns`` rotations)."""
    import torchvision

    if dataset.paths is not None:
        import PIL

        decoder = f"PIL {PIL.__version__} (convert RGB)"
    else:
        decoder = "in-memory uint8 arrays"
    outputs = {name: dim for name, dim in dims.items() if not layout.is_tap_dir(name)}
    teacher_entry = {"name": teacher.name, "arch": teacher.arch, "sha256": teacher.sha256, "outputs": outputs,
                     "bn_mode": "eval"}
    if tap_shapes:
        teacher_entry["taps"] = {tap: {"dir": layout.tap_dir(tap), "shape": list(shape)}
                                 for tap, shape in sorted(tap_shapes.items())}
    return {
        "schema": layout.SCHEMA,
        "fingerprint": fingerprint,
        "teacher": teacher_entry,
        "transform": {"spec": spec_dict(spec), "view0": "centre", "seed": seed, "sampler": "sample_rng(seed, 0, index, k)",
                      "mean": [float(v) for v in mean], "std": [float(v) for v in std],
                      "interpolation": "bilinear, antialias", "torchvision": torchvision.__version__,
                      "decoder": decoder,
                      **({"turns": turns, "rows": "row j = crop j // turns rotated by j % turns quarter turns"}
                         if turns > 1 else {})},
        "dataset": {"name": dataset.name, "manifest_hash": dataset_hash, "num_images": len(dataset),
                    "index_file": "index/files.txt" if dataset.paths is not None else None},
        "views": views,
        "dtype": "float16",
        "shard_size": shard_size,
        "bytes_per_image": views * (2 * sum(dims.values()) + PARAMS_DTYPE.itemsize),
    }


def _shard_plans(num_images: int, views: int, shard_size: int) -> list[ShardPlan]:
    return [ShardPlan(shard, start, min(num_images, start + shard_size), views)
            for shard, start in enumerate(range(0, num_images, shard_size))]


def _shard_status(root: Path, plan: ShardPlan) -> dict:
    seal = layout.seal_file(root, plan.shard)
    if seal.is_file():
        return layout.read_json(seal)
    status = "partial" if layout.bitmap_file(root, plan.shard).is_file() else "pending"
    return {"id": plan.shard, "start": plan.start, "stop": plan.stop, "rows": plan.rows, "status": status}


def write_manifest(root: Path, header: dict, plans: list[ShardPlan], build: dict) -> dict:
    """Assemble the manifest from the shards' commit records; written last, atomically."""
    shards = [_shard_status(root, plan) for plan in plans]
    manifest = dict(header, shards=shards, build=build, complete=all(s["status"] == "sealed" for s in shards))
    layout.atomic_write_json(root / layout.MANIFEST, manifest)
    return manifest


def _forward(teacher: Teacher, batch: torch.Tensor, outputs: set[str], device: torch.device, amp: str,
             channels_last: bool, mean, std, taps: tuple[str, ...] = ()
             ) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """The rows to store, ``{output or tap directory: (N, D) float16}``, and each tap's per-image shape."""
    images = normalize(batch.to(device, non_blocking=True), mean, std)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = (torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp]) if amp != "none"
                else contextlib.nullcontext())
    with autocast:
        result = teacher.forward(images, outputs, taps=taps)
    shapes = {tap: tuple(int(extent) for extent in result[tap].shape[1:]) for tap in taps}
    with np.errstate(over="ignore"):  # fp16 overflow becomes inf, which _check_rows reports
        rows = {name: result[name].float().cpu().numpy().astype(np.float16) for name in sorted(outputs)}
        for tap in taps:  # a map is stored flattened (C·h·w in its own memory order), reshaped on lookup
            rows[layout.tap_dir(tap)] = (result[tap].float().reshape(result[tap].shape[0], -1)
                                         .cpu().numpy().astype(np.float16))
    return rows, shapes


def _check_rows(features: dict[str, np.ndarray], indices: np.ndarray, views: int) -> None:
    """A non-finite value (incl. fp16 overflow) or an all-zero row would poison or hide in the cache."""
    for name, values in features.items():
        for label, bad in (("non-finite", ~np.isfinite(values).all(axis=1)), ("all-zero", ~values.any(axis=1))):
            if bad.any():
                images = sorted({int(indices[row // views]) for row in np.flatnonzero(bad)})
                raise TrainingError(f"teacher produced {int(bad.sum())} {label} {name} rows "
                                    f"(images {images[:5]}{'…' if len(images) > 5 else ''}); refusing to cache them",
                                    hint="check the teacher weights and input; with --amp fp16 try bf16 or none")


def _taps_text(taps) -> str:
    return f" and taps {sorted(taps)}" if taps else ""


@contextlib.contextmanager
def _builder_lock(root: Path):
    """Hold the cache directory's lock (runlock.py's ``flock`` on ``<cache>/.lock``, taken by rank 0) while building.

    Two processes given the same ``--cache`` (two runs of a sweep, a run and a ``cache build``) would otherwise
    both write its shards; the second is refused with exit 2 naming the first, and reuses the finished cache when
    rerun. A directory the lock created is removed again if the build fails before writing into it."""
    from distillctl.runlock import acquire

    lock = distributed.main_first(acquire, root, "cache build", what="feature cache")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def build_cache(teacher: Teacher, dataset: ImageDataset, out: str | Path, *, spec: ViewSpec, views: int,
                outputs: set[str], mean, std, taps: Iterable[str] = (), turns: int = 1, batch_size: int = 256,
                device: str = "cpu", amp: str = "none",
                channels_last: bool = False, seed: int = 0, shard_size: int = 50000, num_workers: int = 0,
                progress: bool = True, on_batch: Callable[[BatchInfo], None] | None = None,
                flush_seconds: float = 2.0, max_bad_fraction: float = DEFAULT_MAX_FRACTION) -> FeatureCache:
    """Build (or resume, or reuse) the cache at ``out``; returns it opened. See the module docstring.

    Unreadable images get their keyed substitute's rows (as training substitutes them); they are counted,
    listed in ``<out>/bad_images.txt`` and reported, and above ``max_bad_fraction`` the build stops (exit 2).
    ``taps``: teacher taps (``distillctl.taps`` names, e.g. ``stage:-1``) stored beside the outputs, for methods
    that read the teacher's maps (PCD, dense-reg); each is stored flattened and reshaped on lookup.
    ``turns``: each crop is also stored at 1..turns-1 quarter turns (DLKD's rotated copies); ``views`` counts crops."""
    outputs = set(outputs)
    taps = tuple(sorted(set(taps)))
    if len({layout.tap_dir(tap) for tap in taps}) != len(taps):
        raise UsageError(f"cache taps {list(taps)} map to the same directory name; cache them separately")
    if views < 1 or batch_size < 1 or shard_size < 1:
        raise UsageError("--views, --batch-size and --shard-size must be >= 1")
    if turns not in (1, 2, 3, 4):
        raise UsageError(f"--rotations must be 1, 2, 3 or 4 (quarter turns 0..rotations-1); got {turns}")
    spec = dataclasses.replace(spec, quarter_turns=0)  # the cache's spec is unrotated; rotations are its turns
    rows = views * turns  # stored rows per image
    if not outputs or not all(layout.is_output_name(name) for name in outputs):
        raise UsageError(f"cache outputs must be a non-empty subset of {', '.join(layout.OUTPUT_KINDS)} (pooled_<k>/"
                         f"proj_<k> for teacher k of an ensemble); got {sorted(outputs)}")
    if amp not in AMP_DTYPES:
        raise UsageError(f"unknown --amp '{amp}'; valid: {', '.join(AMP_DTYPES)}")
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} requested but CUDA is not available")
    if torch_device.type == "cuda" and torch_device.index is None and distributed.is_distributed():
        torch_device = torch.device("cuda", distributed.info().local_rank)
    if len(dataset) == 0:
        raise InputError("the dataset is empty; nothing to cache")
    root = Path(out).expanduser()
    rank = distributed.info()
    dataset_hash = dataset.manifest_hash()
    fingerprint = cache_fingerprint(teacher.sha256, outputs, dataset_hash, spec, views, mean, std, seed, taps, turns)
    existing = read_manifest(root) if (root / layout.MANIFEST).is_file() else None
    if existing is None and root.is_dir():
        foreign = sorted(p.name for p in root.iterdir()
                         if p.name not in LAYOUT_NAMES and not layout.is_output_name(p.name)
                         and not layout.is_tap_dir(p.name) and not p.name.startswith("."))
        if foreign:
            raise InputError(f"--out {root} is not empty and holds no feature cache (found {', '.join(foreign[:3])})",
                             hint="choose a new or empty directory for the cache")
    if existing is not None:
        differences = manifest_differences(existing, teacher_sha256=teacher.sha256, outputs=outputs,
                                           dataset_hash=dataset_hash, spec=spec, mean=mean, std=std, views=views,
                                           seed=seed, taps=taps, turns=turns)
        if differences:
            raise GateError(f"{root} already holds a feature cache for another teacher/data/transform: "
                            + "; ".join(differences),
                            hint="choose another --out, or delete that directory to rebuild")
        if existing.get("complete"):  # same inputs; its outputs (and taps) may be a superset of the requested ones
            return FeatureCache.open(root)
        if existing.get("fingerprint") != fingerprint:
            raise GateError(f"{root} holds an unfinished build of outputs {sorted(existing['teacher']['outputs'])}"
                            f"{_taps_text(existing['teacher'].get('taps'))}; this build asks for {sorted(outputs)}"
                            f"{_taps_text(taps)}",
                            hint="resume it with the same --outputs, or choose another --out")
        if int(existing["shard_size"]) != shard_size:
            raise UsageError(f"{root} was started with shard size {existing['shard_size']}; resume with the same")

    with _builder_lock(root):  # one builder per cache directory (a second process gets exit 2, naming this one)
        teacher.freeze()
        teacher.set_bn_mode("eval")
        teacher.to(torch_device)
        if channels_last:
            teacher.backbone.to(memory_format=torch.channels_last)
        if taps:
            from distillctl.taps import check_taps

            check_taps(teacher.backbone, taps, f"feature cache, teacher {teacher.name}")
        producer = ViewProducer(dataset, spec, views, seed, turns)
        probe_index, probe_views, _, _ = _collate([producer[0]])
        bad = BadImages("cache", len(dataset), max_bad_fraction)
        probe, tap_shapes = _forward(teacher, probe_views, outputs, torch_device, amp, channels_last, mean, std, taps)
        dims = {name: int(values.shape[1]) for name, values in probe.items()}

        plans = _shard_plans(len(dataset), rows, shard_size)
        already = layout.dir_size(root) if root.exists() else 0
        row_bytes = 2 * sum(dims.values()) + PARAMS_DTYPE.itemsize
        check_disk_space(root, max(0, estimate_bytes(len(dataset), rows, dims, shard_size) - already),
                         f" = {len(dataset)} images x {views} views"
                         + (f" x {turns} rotations" if turns > 1 else "") + f" x {row_bytes} B"
                         + (f" + headers, minus {already:,} bytes already built" if already else " + headers"))
        header = _header(teacher, dataset, dataset_hash, fingerprint, spec, rows, dims, mean, std, seed, shard_size,
                         tap_shapes, turns)
        build_info = {"device": str(torch_device), "amp": amp, "channels_last": channels_last, "batch_size": batch_size,
                      "world_size": rank.world_size, "torch": torch.__version__,
                      "created": (existing or {}).get("build", {}).get("created")
                      or datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if rank.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if dataset.paths is not None and not (root / "index" / "files.txt").is_file():
                rel = [os.path.relpath(p, dataset.root) if dataset.root else p for p in dataset.paths]
                layout.atomic_write_bytes(root / "index" / "files.txt", ("\n".join(rel) + "\n").encode())
            write_manifest(root, header, plans, build_info)
        distributed.barrier()

        names = ["params", *sorted(dims)]
        mine = [plan for plan in plans if plan.shard % rank.world_size == rank.rank]
        writers_done = sum(plan.images for plan in mine if finish_sealed(root, plan, names) is not None)
        todo = [plan for plan in mine if not layout.seal_file(root, plan.shard).is_file()]
        meter = BuildProgress(sum(plan.images for plan in mine), writers_done, enabled=progress and rank.is_main)
        images_per_batch = max(1, batch_size // rows)
        started = time.perf_counter()
        try:
            for plan in todo:
                writer = ShardWriter(root, plan, dims)
                meter.resumed(writer.images_done)
                loader = torch.utils.data.DataLoader(
                    producer, batch_sampler=writer.pending_chunks(images_per_batch), num_workers=num_workers,
                    collate_fn=_collate, pin_memory=torch_device.type == "cuda")
                last_flush = time.perf_counter()
                try:
                    for indices, pixels, records, unreadable in loader:
                        bad.add(unreadable)
                        if rank.world_size == 1:  # several ranks decide together once every shard is built
                            bad.check()
                        features, _ = _forward(teacher, pixels, outputs, torch_device, amp, channels_last, mean, std,
                                               taps)
                        for name, values in features.items():
                            if values.shape != (len(indices) * rows, dims[name]):
                                raise TrainingError(f"teacher returned {name} of shape {values.shape}; expected "
                                                    f"({len(indices) * rows}, {dims[name]})")
                        _check_rows(features, indices, rows)
                        writer.write(indices, records, features)
                        if time.perf_counter() - last_flush >= flush_seconds:
                            writer.flush()
                            last_flush = time.perf_counter()
                        meter.advance(len(indices))
                        if on_batch is not None:
                            on_batch(BatchInfo(plan.shard, indices, meter.done, meter.total))
                except BaseException:
                    writer.flush()  # keep the finished rows for the resume (a kill -9 skips this; the bitmap covers it)
                    writer.close()
                    if rank.world_size == 1:
                        write_manifest(root, header, plans, build_info)
                    raise
                writer.seal()
                if rank.world_size == 1:
                    write_manifest(root, header, plans, build_info)
        finally:
            meter.close()
        seconds = time.perf_counter() - started
        distributed.barrier()
        bad = bad.gathered()  # the same merged list on every rank: all stop together, or none
        bad.check()
        built = [meter.session_done]
        if distributed.is_distributed():
            built = [0] * rank.world_size
            torch.distributed.all_gather_object(built, meter.session_done)
        if rank.is_main:
            if bad:
                bad.write(root / "bad_images.txt")
                bad.report("substituted", root / "bad_images.txt")
            build_info.update(finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              seconds=round(seconds, 3), images_built=sum(built), unreadable_images=len(bad),
                              images_per_second=round(sum(built) / seconds, 2) if seconds > 0 else None)
            manifest = write_manifest(root, header, plans, build_info)
            if not manifest["complete"]:
                missing = [s["id"] for s in manifest["shards"] if s["status"] != "sealed"]
                raise TrainingError(f"cache build finished with unsealed shards {missing[:10]}")
        distributed.barrier()
        return FeatureCache.open(root)
