"""On-disk layout of a feature cache and the small file primitives it relies on.

```
<cache>/
  manifest.json                 schema, fingerprint, teacher, transform, dataset, K, dims, shards[...]
  index/files.txt               canonical relative image paths (defines the image index), path datasets only
  params/shard_00000.npy        PARAMS_DTYPE, (images_in_shard * K,)   row = local_image * K + k
  <output>/shard_00000.npy      float16, (images_in_shard * K, D)      one directory per output (pooled, proj)
  done/shard_00000.bits         per-image done bitmap (np.packbits), rewritten atomically while building
  done/shard_00000.seal.json    the shard's commit record: file hashes and checks (written before the renames)
  artifacts/                    offline artefacts derived from the cache (kNN bags, k-means labels)
```

A shard is built into ``*.npy.partial`` files; sealing writes the commit record first and then renames
the partials, so a kill at any point leaves either a resumable partial shard or a sealed one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

SCHEMA = "distillctl.feature_cache/1"
MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"
OUTPUT_KINDS = ("pooled", "proj")
# teacher output names: a multi-teacher run (distillctl.teachers.ensemble) has teacher k's outputs as
# pooled_k / proj_k; group 1 is the kind, group 2 the teacher index (None for the plain names)
OUTPUT_NAME = re.compile(r"^(pooled|proj)(?:_(\d{1,2}))?$")


def is_output_name(name: str) -> bool:
    return OUTPUT_NAME.match(name) is not None


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


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_path(path)
    except OSError:  # some filesystems refuse to fsync directories; the rename is still atomic
        pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file in the same directory, fsync it, then ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


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
