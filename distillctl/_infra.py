"""Private infrastructure shared by every package: atomic files, sha256, logging, collective primitives.

This module imports nothing from the rest of ``distillctl`` (``tests/core/test_import_rules.py`` enforces it),
so any package may import it without creating a cycle or a dependency on the trainer:

- :func:`atomic_path` / :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json`:
  the one way files that later stages or resumes trust are written — a temp file in the same directory,
  fsynced, renamed over the destination, and the directory fsynced so the rename survives a power cut.
  A kill at any moment leaves either the old file or the new one, never a torn one.
- :func:`sha256_file`: the one content hash of a file (teachers, students, caches, exports).
- :func:`get_logger`: domain code logs through :mod:`logging`; only the CLI renders the records (with Rich).
- :func:`is_distributed`, :func:`info`, :func:`all_gather_concat`, :func:`all_reduce_mean`: the collective
  primitives methods need (they are re-exported by ``distillctl.train.distributed``, the trainer's helpers),
  so methods never import trainer internals. Without a process group each is the identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # torch loads on first use: the registry/listing commands never need it
    import torch

LOGGER_ROOT = "distillctl"

# --- atomic files ----------------------------------------------------------------------------------------


def fsync_path(path: str | Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it is durable; filesystems that refuse it still rename atomically."""
    try:
        fsync_path(path)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(destination: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``destination`` for the caller to write; on a clean exit the temp file is
    fsynced, given the umask's permissions (mkstemp makes 0600) and renamed over ``destination``, then the
    directory is fsynced. On an exception the temp file is removed and ``destination`` is untouched."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{destination.name}.tmp-", suffix=".tmp", dir=destination.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(destination.parent)


def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically and durably (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)  # plain write: a full disk is an OSError here, never a torn destination


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Pretty, key-sorted JSON with a trailing newline, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# --- hashing ---------------------------------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- logging ---------------------------------------------------------------------------------------------


def get_logger(name: str) -> logging.Logger:
    """A logger under ``distillctl`` for domain code (``get_logger(__name__)``). Records propagate to the CLI's
    handler, which renders them (warnings as ``warning: …``); without the CLI they go wherever the caller's
    logging configuration sends them."""
    if name != LOGGER_ROOT and not name.startswith(LOGGER_ROOT + "."):
        name = f"{LOGGER_ROOT}.{name}"
    return logging.getLogger(name)


def phase(message: str) -> None:
    """One line saying what a long step is doing now (eval, export, bundle): an INFO record, main process only."""
    if os.environ.get("RANK", "0") in ("", "0"):
        get_logger("distillctl.phase").info(message)


# --- collective primitives -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """True inside an initialised process group. Without torch loaded there can be none, so this never imports it."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    """This process's rank, world size and local rank (rank 0 of 1 without a process group)."""
    if not is_distributed():
        return DistInfo()
    import torch.distributed as dist

    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def all_gather_concat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order). No gradient flows back."""
    if not is_distributed():
        return tensor
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered, dim=0)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over ranks (a detached copy; ``value`` itself without a process group)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()
