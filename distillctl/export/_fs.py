"""Atomic file replacement for export artefacts: ``distillctl._infra.atomic_path`` (temp name in the same dir,
fsync, rename, fsync of the folder), re-exported here for the exporters."""

from __future__ import annotations

from pathlib import Path

from distillctl._infra import atomic_path


def write_bytes_atomic(destination: str | Path, data: bytes) -> Path:
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)
    return Path(destination)
