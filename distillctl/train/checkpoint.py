"""Atomic, complete training checkpoints for exact resume.

A checkpoint holds everything the next step depends on: student, method state (heads, queues, EMA
encoders), optimizer, AMP scaler, the global step, and the torch RNG states. The LR schedule is a pure
function of the step and the data order / augmentations are keyed by (seed, epoch, index), so nothing
else is needed. Files are written to a temporary name, fsynced and renamed; the newest loadable one
wins. An unreadable file (truncated, corrupt) is moved into ``<dir>/unreadable/`` with a warning, so it
is kept for inspection but can no longer outrank, by its step number, the checkpoints a resumed run writes
(pruning keeps the highest steps: left in place, all-unreadable old files would make it delete the new ones).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from distillctl._infra import atomic_path, atomic_write_bytes, atomic_write_text, get_logger  # noqa: F401  (re-exported)
from distillctl.errors import InputError

log = get_logger(__name__)
_NAME = re.compile(r"^ckpt_(\d{9})\.pt$")


def atomic_torch_save(obj: Any, path: Path, kill_half_way: bool = False) -> None:
    """Serialise in memory, then write+fsync a temp file and rename: a full disk or a kill leaves the
    previous checkpoint untouched (the bytes are written with plain ``write`` so ENOSPC is an OSError)."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            if kill_half_way:  # test hook: a kill -9 in the middle of the write
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
                os._exit(137)
            handle.write(data)
    except OSError as exc:
        from distillctl.errors import TrainingError

        raise TrainingError(f"could not write checkpoint {path}: {exc.strerror or exc}; the previous checkpoint is intact",
                            hint="free disk space, then resume with --resume") from exc


class CheckpointManager:
    """``<dir>/ckpt_<step>.pt`` files, keep-last-N, newest-loadable lookup."""

    def __init__(self, directory: Path, keep_last: int = 2) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    def list(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    @property
    def unreadable_dir(self) -> Path:
        """Where unreadable checkpoints are set aside (outside :meth:`list`, so never loaded nor pruned)."""
        return self.directory / "unreadable"

    def save(self, state: dict[str, Any], step: int) -> Path:
        from distillctl.train.faults import KILL_IN_CHECKPOINT_ENV, env_step

        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".ckpt_*.pt.tmp*"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        path = self.directory / f"ckpt_{step:09d}.pt"
        atomic_torch_save(state, path, kill_half_way=env_step(KILL_IN_CHECKPOINT_ENV) == step)
        for _, old in self.list()[: -self.keep_last]:
            if old != path:  # whatever else is on disk, the checkpoint just written survives its own pruning
                old.unlink(missing_ok=True)
        return path

    def set_aside(self, path: Path, reason: str) -> Path:
        """Move an unreadable checkpoint into :attr:`unreadable_dir` and say so; returns the new path."""
        self.unreadable_dir.mkdir(parents=True, exist_ok=True)
        target = self.unreadable_dir / path.name
        suffix = 1
        while target.exists():  # an earlier resume set aside a file of the same name
            target = self.unreadable_dir / f"{path.name}.{suffix}"
            suffix += 1
        os.replace(path, target)
        log.warning(f"checkpoint {path.name} is unreadable ({reason}); moved to "
                    f"{target.relative_to(self.directory)} and falling back to the previous one")
        return target

    def load_latest(self, fingerprint: str | None = None) -> dict[str, Any] | None:
        """The newest checkpoint that loads (``weights_only=True``) and matches ``fingerprint``; unreadable
        newer ones are set aside on the way (:meth:`set_aside`)."""
        set_aside = 0
        for step, path in reversed(self.list()):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # truncated or corrupt file: set it aside, fall back to the previous one
                self.set_aside(path, type(exc).__name__)
                set_aside += 1
                continue
            if not isinstance(state, dict) or "step" not in state:
                raise InputError(f"{path} is not a distillctl training checkpoint")
            if fingerprint is not None and state.get("fingerprint") != fingerprint:
                raise InputError(
                    f"checkpoint {path} belongs to a different configuration (fingerprint mismatch)",
                    hint="use --restart to discard it, or rerun with the original recipe",
                )
            return state
        if set_aside:
            log.warning(f"no readable checkpoint left in {self.directory} ({set_aside} unreadable moved to "
                        f"{self.unreadable_dir})")
        return None

    def clear(self) -> None:
        for _, path in self.list():
            path.unlink(missing_ok=True)


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
