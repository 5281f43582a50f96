"""Reading a sealed feature cache: manifest, memory-mapped fp16 shards, exact view replay, compatibility gate.

The trainer picks a stored view ``k`` of image ``index``, replays its parameters with
:func:`distillctl.data.views.apply_view_uint8` (:meth:`FeatureCache.replay`) and takes the teacher's
outputs for that view from :meth:`FeatureCache.lookup` instead of running the teacher. Shards are
opened lazily with ``np.load(mmap_mode="r")`` and dropped when the object is pickled, so DataLoader
workers map the files themselves instead of copying them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from distillctl.cache import layout
from distillctl.data.views import PARAMS_DTYPE, ViewParams, ViewSpec, apply_view_uint8, record_to_params
from distillctl.errors import GateError, InputError


def spec_from_dict(values: dict) -> ViewSpec:
    """Rebuild a ViewSpec from its manifest form (JSON turns tuples into lists)."""
    return ViewSpec(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


def centre_spec(spec: ViewSpec) -> ViewSpec:
    """The spec of view 0: the deterministic centre crop at the cache's size."""
    return ViewSpec(size=spec.size, family="centre", crop_pct=spec.crop_pct)


def rotated(spec: ViewSpec, turns: int) -> ViewSpec:
    """``spec`` with its finished view rotated by ``turns`` quarter turns (0: ``spec`` itself)."""
    return dataclasses.replace(spec, quarter_turns=turns) if turns else spec


def manifest_turns(manifest: dict) -> int:
    """How many rotations each stored crop is cached in (1: unrotated only, the form before rotations)."""
    return int(manifest["transform"].get("turns", 1))


def manifest_differences(manifest: dict, *, teacher_sha256: str, outputs: Iterable[str], dataset_hash: str,
                         spec: ViewSpec, mean: Iterable[float], std: Iterable[float], views: int | None = None,
                         seed: int | None = None, taps: Iterable[str] = (), turns: int = 1) -> list[str]:
    """Human-readable list of what differs between a cache manifest and what a run or build expects.

    ``views`` is the number of stored crops per image (K) and ``turns`` the rotations the run needs of each
    (quarter turns 0..turns-1); a cache holding more rotations than needed serves the run."""
    differences: list[str] = []
    cached_sha = manifest["teacher"]["sha256"]
    if cached_sha != teacher_sha256:
        differences.append(f"teacher sha256 {cached_sha[:12]}… (cache) vs {teacher_sha256[:12]}… (run)")
    cached_outputs = sorted(manifest["teacher"]["outputs"])
    missing = sorted(set(outputs) - set(cached_outputs))
    if missing:
        differences.append(f"teacher outputs {cached_outputs} (cache) lack {missing} (run)")
    cached_taps = sorted(manifest["teacher"].get("taps") or {})
    missing_taps = sorted(set(taps) - set(cached_taps))
    if missing_taps:
        differences.append(f"teacher taps {cached_taps} (cache) lack {missing_taps} (run)")
    cached_data = manifest["dataset"]["manifest_hash"]
    if cached_data != dataset_hash:
        differences.append(f"dataset manifest {cached_data[:12]}… (cache) vs {dataset_hash[:12]}… (run)")
    cached_spec = spec_from_dict(manifest["transform"]["spec"])
    spec = dataclasses.replace(spec, quarter_turns=0)  # rotations are the cache's turns, not part of its spec
    if spec != cached_spec:
        changed = [name for name in ("size", "family", "scale", "ratio", "flip", "crop_pct")
                   if getattr(spec, name) != getattr(cached_spec, name)]
        differences.append("view spec " + ", ".join(f"{name}={getattr(cached_spec, name)!r} (cache) vs "
                                                     f"{getattr(spec, name)!r} (run)" for name in changed))
    for label, cached, wanted in (("mean", manifest["transform"]["mean"], list(mean)),
                                  ("std", manifest["transform"]["std"], list(std))):
        if len(cached) != len(wanted) or any(not math.isclose(float(a), float(b), abs_tol=1e-6)
                                             for a, b in zip(cached, wanted)):
            differences.append(f"normalisation {label} {list(cached)} (cache) vs {[float(v) for v in wanted]} (run)")
    cached_turns = manifest_turns(manifest)
    if turns > cached_turns:
        differences.append(f"rotations {cached_turns} (cache: quarter turns 0..{cached_turns - 1}) vs {turns} (run: "
                           f"0..{turns - 1})")
    if views is not None and int(manifest["views"]) // cached_turns != views:
        differences.append(f"views K={int(manifest['views']) // cached_turns} (cache) vs {views} (run)")
    if seed is not None and int(manifest["transform"]["seed"]) != seed:
        differences.append(f"view seed {manifest['transform']['seed']} (cache) vs {seed} (run)")
    return differences


def read_manifest(path: str | Path) -> dict:
    """Parse ``<path>/manifest.json`` (complete or not). InputError if absent, GateError if unreadable."""
    root = Path(path).expanduser()
    manifest_path = root / layout.MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"no feature cache at {root} ({layout.MANIFEST} missing)",
                         hint="build one with: distillctl cache build --teacher SPEC --data PATH --out DIR")
    try:
        manifest = layout.read_json(manifest_path)
    except (OSError, ValueError) as exc:
        raise GateError(f"feature cache manifest {manifest_path} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != layout.SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise GateError(f"feature cache at {root} has schema {found!r}; this distillctl reads {layout.SCHEMA!r}",
                        hint="rebuild the cache with this version of distillctl")
    return manifest


@dataclass
class VerifyReport:
    """Result of re-reading every shard: hashes, finite values, zero rows, replay parameters, norm outliers."""

    path: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shards_checked: int = 0
    bytes_hashed: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "problems": self.problems, "warnings": self.warnings,
                "shards_checked": self.shards_checked,
                "bytes_hashed": self.bytes_hashed, "seconds": round(self.seconds, 3)}


def _count_bad_rows(array: np.ndarray, block: int = 65536) -> tuple[int, int, np.ndarray]:
    """(non-finite values, all-zero rows, row norms) of a (rows, D) array, read in blocks."""
    nonfinite = 0
    zero_rows = 0
    norms = np.empty(array.shape[0], dtype=np.float64)
    for start in range(0, array.shape[0], block):
        chunk = np.asarray(array[start:start + block], dtype=np.float32)
        finite = np.isfinite(chunk)
        nonfinite += int((~finite).sum())
        zero_rows += int((~chunk.any(axis=1)).sum())
        norms[start:start + block] = np.linalg.norm(np.where(finite, chunk, 0.0), axis=1)
    return nonfinite, zero_rows, norms


def _check_params(params: np.ndarray) -> int:
    """Number of stored views whose crop box does not fit inside the recorded source image."""
    bad = ((params["height"] <= 0) | (params["width"] <= 0) | (params["top"] < 0) | (params["left"] < 0)
           | (params["top"] + params["height"] > params["src_height"])
           | (params["left"] + params["width"] > params["src_width"]))
    return int(bad.sum())


class FeatureCache:
    """A sealed cache of teacher outputs for K stored views per image.

    With rotations (``turns`` T > 1, for methods that show rotated copies, e.g. DLKD) every stored crop is cached
    at quarter turns 0..T-1: an image has ``views`` = K·T rows and row j is crop j // T rotated by j % T.
    """

    path: Path
    manifest: dict
    num_images: int
    views: int
    outputs: dict[str, int]
    spec: ViewSpec

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self.num_images = int(manifest["dataset"]["num_images"])
        self.views = int(manifest["views"])  # rows per image: stored crops x rotations
        self.turns = manifest_turns(manifest)
        self.crops = self.views // self.turns
        self.outputs = {name: int(dim) for name, dim in manifest["teacher"]["outputs"].items()}
        # teacher taps stored beside the outputs: tap name → (its directory, its per-image shape)
        self.taps = {tap: (str(entry["dir"]), tuple(int(extent) for extent in entry["shape"]))
                     for tap, entry in (manifest["teacher"].get("taps") or {}).items()}
        self.stored = layout.stored_dims(manifest)  # every array's row width: outputs and flattened taps
        self.spec = spec_from_dict(manifest["transform"]["spec"])
        self.mean = tuple(float(v) for v in manifest["transform"]["mean"])
        self.std = tuple(float(v) for v in manifest["transform"]["std"])
        self.seed = int(manifest["transform"]["seed"])
        self.shard_size = int(manifest["shard_size"])
        self.fingerprint = str(manifest["fingerprint"])
        self.num_shards = len(manifest["shards"])
        shards = manifest.get("shards", [])
        self._complete = bool(manifest.get("complete")) and bool(shards) and all(s.get("status") == "sealed" for s in shards)
        self._arrays: dict[tuple[str, int], np.ndarray] = {}

    # ----------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, verify: bool = False, *, allow_incomplete: bool = False) -> "FeatureCache":
        """Open a complete cache. InputError when absent; GateError when incomplete or corrupt.

        ``allow_incomplete=True`` opens an interrupted build's manifest only (for ``check_compatible`` and
        ``is_complete`` before resuming it with ``build_cache``); its rows cannot be looked up.
        """
        root = Path(path).expanduser()
        manifest = read_manifest(root)
        shards = manifest.get("shards", [])
        unsealed = [s["id"] for s in shards if s.get("status") != "sealed"]
        try:
            cache = cls(root, manifest)
        except (KeyError, TypeError, ValueError) as exc:
            raise GateError(f"feature cache manifest at {root} is malformed ({type(exc).__name__}: {exc})",
                            hint="rebuild the cache") from exc
        if allow_incomplete and not cache.is_complete():
            return cache
        if not cache.is_complete():
            raise GateError(
                f"feature cache at {root} is incomplete ({len(shards) - len(unsealed)}/{len(shards)} shards sealed)",
                hint="resume it by rerunning the same `distillctl cache build` command")
        cache._check_files()
        if verify:
            report = cache.verify()
            if not report.ok:
                raise GateError(f"feature cache at {root} failed verification: {report.problems[0]}"
                                + (f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""),
                                hint=f"run `distillctl cache verify {root}` for the full report; rebuild the cache")
        return cache

    def _expected_shape(self, name: str, shard: dict) -> tuple[int, ...]:
        return (int(shard["rows"]),) if name == "params" else (int(shard["rows"]), self.stored[name])

    def _check_files(self) -> None:
        """Cheap structural check at open: every shard file exists with the recorded shape and dtype."""
        for shard in self.manifest["shards"]:
            for name in ("params", *self.stored):
                file = layout.data_file(self.path, name, int(shard["id"]))
                if not file.is_file():
                    raise GateError(f"feature cache at {self.path} is missing {file.relative_to(self.path)}",
                                    hint="rebuild the cache (or resume the build)")
                try:
                    array = np.load(file, mmap_mode="r")
                except (OSError, ValueError) as exc:
                    raise GateError(f"feature cache file {file} is unreadable: {exc}") from exc
                dtype = PARAMS_DTYPE if name == "params" else np.dtype(np.float16)
                if array.shape != self._expected_shape(name, shard) or array.dtype != dtype:
                    raise GateError(f"feature cache file {file} has shape {array.shape} {array.dtype}; "
                                    f"manifest says {self._expected_shape(name, shard)} {dtype}")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # memmaps are reopened in the receiving process instead of being copied
        return state

    def _array(self, name: str, shard: int) -> np.ndarray:
        if not self.is_complete():
            raise GateError(f"feature cache at {self.path} is incomplete; resume `distillctl cache build` before reading it")
        key = (name, shard)
        array = self._arrays.get(key)
        if array is None:
            array = np.load(layout.data_file(self.path, name, shard), mmap_mode="r")
            self._arrays[key] = array
        return array

    # ------------------------------------------------------------------------------------ access
    def _locate(self, index: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if index.shape != k.shape:
            raise InputError(f"cache lookup: index and view tensors differ in shape ({index.shape} vs {k.shape})")
        if index.size and (index.min() < 0 or index.max() >= self.num_images):
            raise InputError(f"cache lookup: image index out of range [0, {self.num_images}) "
                             f"(got {int(index.min())}..{int(index.max())}); is this the cache for this dataset?")
        if k.size and (k.min() < 0 or k.max() >= self.views):
            raise InputError(f"cache lookup: view out of range [0, {self.views}) (got {int(k.min())}..{int(k.max())})")
        shard = index // self.shard_size
        row = (index - shard * self.shard_size) * self.views + k
        return shard, row

    def _gather(self, name: str, index: np.ndarray, k: np.ndarray, out: np.ndarray) -> np.ndarray:
        shard, row = self._locate(index, k)
        for shard_id in np.unique(shard):
            mask = shard == shard_id
            out[mask] = self._array(name, int(shard_id))[row[mask]]
        return out

    def lookup(self, index: torch.Tensor, k: torch.Tensor, taps: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Teacher outputs of view ``k[i]`` of image ``index[i]``: ``{output: (B, D) float32}`` on the CPU, plus
        ``{tap: (B, *shape) float32}`` for each of the given ``taps`` (only those: maps are large)."""
        index_np = np.asarray(torch.as_tensor(index).detach().cpu(), dtype=np.int64).reshape(-1)
        k_np = np.asarray(torch.as_tensor(k).detach().cpu(), dtype=np.int64).reshape(-1)
        result: dict[str, torch.Tensor] = {}
        for name, dim in self.outputs.items():
            rows = self._gather(name, index_np, k_np, np.empty((index_np.size, dim), dtype=np.float16))
            result[name] = torch.from_numpy(rows).float()
        for tap in taps:
            if tap not in self.taps:
                raise InputError(f"feature cache at {self.path} holds no teacher tap '{tap}' "
                                 f"(has {', '.join(self.taps) or 'none'})",
                                 hint="rebuild the cache for this method, or use --teacher-mode online")
            directory, shape = self.taps[tap]
            rows = self._gather(directory, index_np, k_np,
                                np.empty((index_np.size, self.stored[directory]), dtype=np.float16))
            result[tap] = torch.from_numpy(rows).float().reshape(index_np.size, *shape)
        return result

    def params_records(self, index: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Stored parameter records (PARAMS_DTYPE) for a batch of (image, view) pairs."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        k = np.asarray(k, dtype=np.int64).reshape(-1)
        return self._gather("params", index, k, np.empty(index.size, dtype=PARAMS_DTYPE))

    def view_params(self, index: int, k: int) -> ViewParams:
        """The stored parameters of view ``k`` of image ``index``."""
        record = self.params_records(np.array([index]), np.array([k]))[0]
        return record_to_params(record)

    def view_spec(self, k: int) -> ViewSpec:
        """Crop 0 is the centre crop; crops 1..K-1 were sampled from :attr:`spec`; row ``k`` shows crop
        ``k // turns`` rotated by ``k % turns`` quarter turns."""
        crop, turns = divmod(k, self.turns)
        return rotated(centre_spec(self.spec) if crop == 0 else self.spec, turns)

    def replay(self, image: torch.Tensor, index: int, k: int) -> torch.Tensor:
        """The exact uint8 (3, size, size) view the teacher saw for view ``k`` of image ``index``."""
        return apply_view_uint8(image, self.view_params(index, k), self.view_spec(k))

    # ------------------------------------------------------------------------------ compatibility
    def check_compatible(self, *, teacher_sha256: str, outputs: Iterable[str], dataset_hash: str, spec: ViewSpec,
                         mean: Iterable[float], std: Iterable[float], taps: Iterable[str] = (),
                         turns: int = 1) -> None:
        """Refuse (GateError, exit 3) a cache built for another teacher, dataset, output kind, tap or transform,
        or with fewer rotations than the run shows."""
        differences = manifest_differences(self.manifest, teacher_sha256=teacher_sha256, outputs=outputs,
                                           dataset_hash=dataset_hash, spec=spec, mean=mean, std=std, taps=taps,
                                           turns=turns)
        if differences:
            raise GateError(f"feature cache at {self.path} does not match this run: " + "; ".join(differences),
                            hint="rebuild it with `distillctl cache build` for this teacher/data/transform "
                                 "(another --out), or use --teacher-mode online")

    def is_complete(self) -> bool:
        """All shards sealed (always true for a cache opened without ``allow_incomplete``)."""
        return self._complete

    # ------------------------------------------------------------------------------ verification
    def verify(self) -> VerifyReport:
        """Re-hash every shard file and re-check values (finite, no zero rows, boxes inside the image)."""
        return verify_store(self.path, self.manifest)

    def info(self) -> dict[str, Any]:
        return cache_info(self.path, self.manifest)


def verify_store(root: Path, manifest: dict) -> VerifyReport:
    """The checks behind ``distillctl cache verify``; works on incomplete caches too (reports them)."""
    started = time.perf_counter()
    report = VerifyReport(path=str(root))
    outputs = layout.stored_dims(manifest)  # pooled/proj and the flattened teacher taps
    norm_stats: dict[str, list[tuple[int, int, float, float]]] = {name: [] for name in outputs}
    for shard in manifest.get("shards", []):
        shard_id = int(shard["id"])
        if shard.get("status") != "sealed":
            report.problems.append(f"shard {shard_id}: not sealed (status {shard.get('status')!r}); resume the build")
            continue
        report.shards_checked += 1
        for name in ("params", *outputs):
            file = layout.data_file(root, name, shard_id)
            label = f"shard {shard_id} {name}"
            if not file.is_file():
                report.problems.append(f"{label}: file {file.relative_to(root)} is missing")
                continue
            digest = layout.sha256_file(file)
            report.bytes_hashed += file.stat().st_size
            if digest != shard["sha256"].get(name):
                report.problems.append(f"{label}: sha256 mismatch ({digest[:12]}… on disk, "
                                       f"{str(shard['sha256'].get(name))[:12]}… in manifest)")
            try:
                array = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as exc:
                report.problems.append(f"{label}: unreadable ({exc})")
                continue
            expected_rows = int(shard["rows"])
            if array.shape[0] != expected_rows or (name != "params" and array.shape[1:] != (outputs[name],)):
                report.problems.append(f"{label}: shape {array.shape}, expected {expected_rows} rows")
                continue
            if name == "params":
                if array.dtype != PARAMS_DTYPE:
                    report.problems.append(f"{label}: dtype {array.dtype} is not the replay-parameter dtype")
                elif (bad := _check_params(array)):
                    report.problems.append(f"{label}: {bad} stored crop boxes fall outside their image")
                continue
            nonfinite, zero_rows, norms = _count_bad_rows(array)
            if nonfinite:
                report.problems.append(f"{label}: {nonfinite} non-finite values")
            if zero_rows:
                report.problems.append(f"{label}: {zero_rows} all-zero rows (unwritten or dead features)")
            if norms.size:
                norm_stats[name].append((shard_id, int(norms.size), float(norms.mean()), float(norms.std())))
    # A shard whose mean embedding norm sits 5 row-norm standard deviations away from the pooled mean points at
    # a broken teacher run; shards legitimately differ (ImageFolder order groups classes), so it is a warning.
    for name, stats in norm_stats.items():
        total = sum(count for _, count, _, _ in stats)
        if len(stats) < 2 or total == 0:
            continue
        pooled_mean = sum(count * mean for _, count, mean, _ in stats) / total
        pooled_var = sum(count * (std ** 2 + (mean - pooled_mean) ** 2) for _, count, mean, std in stats) / total
        pooled_std = math.sqrt(pooled_var)
        for shard_id, _, mean, _ in stats:
            if pooled_std > 0 and abs(mean - pooled_mean) > 5 * pooled_std:
                report.warnings.append(f"shard {shard_id} {name}: mean norm {mean:.4g} is > 5 sigma from the "
                                       f"pooled {pooled_mean:.4g} +- {pooled_std:.3g}")
    report.seconds = time.perf_counter() - started
    return report


def cache_info(root: Path, manifest: dict) -> dict[str, Any]:
    """What ``distillctl cache info`` shows: fingerprint, transform, data, K, dims, size, completeness."""
    shards = manifest.get("shards", [])
    sealed = sum(1 for s in shards if s.get("status") == "sealed")
    images = int(manifest["dataset"]["num_images"])
    images_done = 0  # read from the seal records and bitmaps: after a kill the manifest lags behind them
    for shard in shards:
        if layout.seal_file(root, int(shard["id"])).is_file():
            images_done += int(shard["stop"]) - int(shard["start"])
        elif (bitmap := layout.bitmap_file(root, int(shard["id"]))).is_file():
            images_done += int(np.unpackbits(np.fromfile(bitmap, dtype=np.uint8)).sum())
    size = layout.dir_size(root)
    return {
        "path": str(root),
        "fingerprint": manifest["fingerprint"],
        "complete": bool(manifest.get("complete")) and sealed == len(shards),
        "shards_sealed": sealed,
        "shards_total": len(shards),
        "images_done": images_done,
        "teacher": manifest["teacher"],
        "transform": manifest["transform"],
        "dataset": manifest["dataset"],
        "views": manifest["views"],
        "turns": manifest_turns(manifest),
        "outputs": manifest["teacher"]["outputs"],
        "taps": manifest["teacher"].get("taps") or {},
        "dtype": manifest["dtype"],
        "shard_size": manifest["shard_size"],
        "size_bytes": size,
        "bytes_per_image": round(size / images, 1) if images else None,
        "feature_bytes_per_image": manifest.get("bytes_per_image"),
        "build": manifest.get("build", {}),
    }
