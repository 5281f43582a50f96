"""On-disk layout of a feature cache and the small file primitives it relies on.

```
<cache>/
  manifest.json                 schema, fingerprint, teacher, transform, dataset, K, dims, shards[...]
  index/files.txt               canonical relative image paths (defines the image index), path datasets only
  params/shard_00000.npy        PARAMS_DTYPE, (images_in_shard * K,)   row = local_image * K + k
  <output>/shard_00000.npy      float16, (images_in_shard * K, D)      one directory per output (pooled, proj)
  tap-<name>/shard_00000.npy    float16, (images_in_shard * K, C*h*w)  a teacher tap (e.g. tap-stage_-1 for the
                                last stage's map), flattened; its tap name and shape are in the manifest
  done/shard_00000.bits         per-image done bitmap (np.packbits), rewritten atomically while building
  done/shard_00000.seal.json    the shard's commit record: file hashes and checks (written before the renames)
  artifacts/                    offline artefacts derived from the cache (kNN bags, k-means labels)
```

A shard is built into ``*.npy.partial`` files; sealing writes the commit record first and then renames
the partials, so a kill at any point leaves either a resumable partial shard or a sealed one.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

# one atomic write and one sha256 for the whole tool (re-exported: the cache modules use them as layout.*)
from distillctl._infra import (atomic_write_bytes, atomic_write_json, fsync_dir, fsync_path,  # noqa: F401
                               sha256_file)
# teacher output names (pooled, proj, pooled_k / proj_k of a multi-teacher run): the teachers' grammar
from distillctl.teachers.ensemble import OUTPUT_NAME

SCHEMA = "distillctl.feature_cache/1"
MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"
OUTPUT_KINDS = ("pooled", "proj")


TAP_DIR = re.compile(r"^tap-[A-Za-z0-9_.-]+$")


def is_output_name(name: str) -> bool:
    return OUTPUT_NAME.match(name) is not None


def tap_dir(tap: str) -> str:
    """The directory a teacher tap's rows live in: ``stage:-1`` → ``tap-stage_-1`` (the manifest maps it back)."""
    return "tap-" + re.sub(r"[^A-Za-z0-9.-]", "_", tap)


def is_tap_dir(name: str) -> bool:
    return TAP_DIR.match(name) is not None


def stored_dims(manifest: dict) -> dict[str, int]:
    """Every stored array of a cache with its row width: the outputs (pooled, proj) and the flattened taps."""
    dims = {name: int(dim) for name, dim in manifest["teacher"]["outputs"].items()}
    for entry in (manifest["teacher"].get("taps") or {}).values():
        dims[entry["dir"]] = math.prod(int(extent) for extent in entry["shape"])
    return dims


def shard_name(shard: int) -> str:
    return f"shard_{shard:05d}"


def data_file(root: Path, output: str, shard: int) -> Path:
    """The feature file of one shard; ``output`` is a feature kind or ``params``."""
    return root / output / f"{shard_name(shard)}.npy"


def partial(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def bitmap_file(root: Path, shard: int) -> Path:
    return root / "done" / f"{shard_name(shard)}.bits"


def seal_file(root: Path, shard: int) -> Path:
    return root / "done" / f"{shard_name(shard)}.seal.json"


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def dir_size(root: Path) -> int:
    """Bytes of every regular file under ``root`` (the cache's size on disk)."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            full = os.path.join(dirpath, filename)
            if os.path.isfile(full) and not os.path.islink(full):
                total += os.path.getsize(full)
    return total
