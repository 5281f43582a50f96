"""WebDataset tar shards as an input format next to ImageFolder, read with the stdlib ``tarfile``.

``--data 'shards/train-{000000..000009}.tar'`` (brace ranges and ``{a,b}`` lists), one ``.tar`` file, or a
directory of ``.tar`` files. A sample is the set of members sharing a key (the member path up to its
first dot after the last ``/``): one image (``.jpg``/``.jpeg``/``.png``/… , any case) and a ``.cls``
holding the integer label. Members of other kinds are ignored; a sample without an image or without a
``.cls`` is counted as a data fault and skipped.

How it is read, and why: each shard's headers are scanned once per process (a sequential pass over the
tar, skipping the payloads), giving every sample's byte offset; images are then read with ``os.pread``
from the big shard files. So the trainer keeps its keyed, seekable data order: the global batches of an
epoch are a permutation keyed by (seed, epoch), ranks take disjoint slices of each global batch and
DataLoader workers take whole batches (no sample is read twice per epoch), and a resumed epoch starts at
the first global batch after the checkpoint — the batches before it are skipped without reading a byte.
Multi-node jobs need large shard files on any seekable storage (local disks, NFS, Lustre, a FUSE mount of
object storage), not a shared filesystem of millions of small files. Plain HTTP streams are not supported.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from distillctl._infra import atomic_path
from distillctl.errors import InputError

TAR_SEP = "::"  # dataset paths of tar samples: "<shard path>::<member name>"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
_BRACE = re.compile(r"\{([^{}]*)\}")
_INDEX: dict[str, dict[str, tuple[int, int]]] = {}  # shard → member → (data offset, size); per process
_FDS: dict[tuple[int, str], int] = {}  # (pid, shard) → fd: forked DataLoader workers open their own


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` → a-000.tar, a-001.tar, a-002.tar (width kept); ``{x,y}`` → both; nested OK."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    if ".." in body:
        low, _, high = body.partition("..")
        if not (low.isdigit() and high.isdigit()):
            raise InputError(f"bad brace range '{{{body}}}' in {pattern}", hint="use {000000..000009}")
        width = len(low) if low.startswith("0") else 0
        if int(high) < int(low):
            raise InputError(f"empty brace range '{{{body}}}' in {pattern}")
        choices = [str(i).zfill(width) for i in range(int(low), int(high) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def is_tar_source(spec: str) -> bool:
    """A brace pattern or path naming .tar shards, or a directory holding only .tar files."""
    if spec.lower().endswith(".tar") or (_BRACE.search(spec) and ".tar" in spec.lower()):
        return True
    path = Path(spec).expanduser()
    if path.is_dir():
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        return bool(entries) and all(p.is_file() and p.suffix.lower() == ".tar" for p in entries)
    return False


def list_shards(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    shards = sorted(path.glob("*.tar")) if path.is_dir() else [Path(p).expanduser() for p in expand_braces(spec)]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise InputError(f"{len(missing)} tar shard(s) not found, e.g. {missing[0]}")
    if not shards:
        raise InputError(f"no .tar shards in {spec}")
    return shards


def _key_and_ext(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (dot + ext).lower()


def index_shard(shard: Path) -> dict[str, tuple[int, int]]:
    """member name → (payload offset, size), from one sequential pass over the tar headers (cached)."""
    key = str(shard)
    if key not in _INDEX:
        try:
            with tarfile.open(shard, mode="r:") as archive:
                _INDEX[key] = {m.name: (m.offset_data, m.size) for m in archive if m.isfile()}
        except (tarfile.TarError, OSError) as exc:
            raise InputError(f"cannot read tar shard {shard}: {exc}",
                             hint="shards must be uncompressed .tar files") from None
    return _INDEX[key]


def read_member(path: str) -> bytes:
    """The bytes of ``<shard>::<member>`` via ``os.pread`` (safe in forked workers: no shared offset)."""
    shard, _, member = path.partition(TAR_SEP)
    offset, size = index_shard(Path(shard))[member]
    fd_key = (os.getpid(), shard)
    if fd_key not in _FDS:
        _FDS[fd_key] = os.open(shard, os.O_RDONLY)
    data = os.pread(_FDS[fd_key], size, offset)
    if len(data) != size:
        raise OSError(f"short read in {shard} ({len(data)} of {size} bytes)")
    return data


def member_size(path: str) -> int:
    shard, _, member = path.partition(TAR_SEP)
    return index_shard(Path(shard))[member][1]


def decode_image(path: str):
    """A PIL image (RGB) of a tar member."""
    from PIL import Image

    with Image.open(io.BytesIO(read_member(path))) as img:
        return img.convert("RGB")


def open_webdataset(spec: str):
    """An ImageDataset over the samples of the shards in ``spec`` (shard order, then member order)."""
    from distillctl.data.datasets import DataFaults, ImageDataset

    faults = DataFaults()
    paths: list[str] = []
    labels: list[int] = []
    shards = list_shards(spec)
    root = os.path.commonpath([str(shard.parent.resolve()) for shard in shards])
    for shard in shards:
        members = index_shard(shard)
        samples: dict[str, dict[str, str]] = {}
        for name in members:
            key, ext = _key_and_ext(name)
            samples.setdefault(key, {})[ext] = name
        for key, parts in samples.items():
            image = next((parts[ext] for ext in parts if ext.endswith(IMAGE_SUFFIXES)), None)
            if image is None or ".cls" not in parts:
                faults.non_image_files.append(f"{shard}{TAR_SEP}{key} (needs an image and a .cls)")
                continue
            text = read_member(f"{shard}{TAR_SEP}{parts['.cls']}").decode("utf-8", "replace").strip()
            if not text.lstrip("-").isdigit() or int(text) < 0:
                raise InputError(f"{shard}{TAR_SEP}{parts['.cls']}: label '{text[:20]}' is not a non-negative integer")
            paths.append(f"{shard}{TAR_SEP}{image}")
            labels.append(int(text))
    if not paths:
        raise InputError(f"no samples (image + .cls) in the shards of {spec}")
    classes = [str(i) for i in range(max(labels) + 1)]
    # name and root from the shards' directory: a brace pattern and the directory give the same manifest hash
    return ImageDataset(name=f"webdataset:{root}", classes=classes, labels=labels, paths=paths, root=root, faults=faults)


def write_shards(images: np.ndarray, labels: list[int], out_dir: Path, per_shard: int, prefix: str = "train",
                 fmt: str = "png") -> list[Path]:
    """Write (N, H, W, 3) uint8 ``images`` as WebDataset shards ``<prefix>-000000.tar`` … (tests, tooling)."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for shard_id, start in enumerate(range(0, len(labels), per_shard)):
        path = out_dir / f"{prefix}-{shard_id:06d}.tar"
        with atomic_path(path) as tmp, tarfile.open(tmp, mode="w") as archive:
            for index in range(start, min(start + per_shard, len(labels))):
                buffer = io.BytesIO()
                Image.fromarray(images[index]).save(buffer, format="PNG" if fmt == "png" else "JPEG")
                for suffix, payload in ((f".{fmt}", buffer.getvalue()), (".cls", str(labels[index]).encode())):
                    info = tarfile.TarInfo(f"{index:08d}{suffix}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
        written.append(path)
    return written
