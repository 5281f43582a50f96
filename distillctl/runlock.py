"""One writer per run directory: an exclusive, non-blocking ``flock`` on ``<run>/.lock``.

Two ``distillctl`` processes training into one folder (one given ``--out runs/a``, the other ``/abs/runs/a`` or a
symlink to it) overwrite each other's checkpoints. Every command that writes into a run directory (``run``,
``pretrain``, ``export``, ``gate``, ``eval`` when it records into the run, ``cache build`` into a run) holds this
lock for its whole life; a second one is refused with exit 2 before it writes or deletes anything, naming the
holder's pid, host and command (written into the lock file after the lock is taken). Building a feature cache
takes the same lock on the cache directory itself (``cache/build.py``), so two processes given one ``--cache`` never
write its shards at once.

- The lock is on the lock file's inode, so every spelling of the path meets the same lock.
- The operating system drops a ``flock`` when its holder dies, even by ``kill -9``: a lock file left behind never
  blocks anyone. Children forked by the holder (DataLoader workers) close their copy at fork, so the lock dies
  with the process that took it.
- Re-entrant per process: a nested acquisition of a directory this process holds (the pipeline's export and gate
  steps, the API calling ``export`` inside a run) only counts up.
- A directory this lock had to create is removed again on release when nothing but the lock file was written,
  so a command refused by a later check leaves no empty run directory behind.
- Under torchrun only rank 0 takes it (the pipeline calls :func:`acquire` through ``distributed.main_first``, so a
  refusal reaches every rank as the same exit-2 error instead of a hang); the ranks share the directory by design.
- Without ``fcntl`` (Windows) or on a filesystem that refuses ``flock``, there is no lock (debug/warning log).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from distillctl._infra import get_logger
from distillctl.errors import UsageError

try:  # POSIX only: Windows has no flock, and gets no lock rather than a crash
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
log = get_logger(__name__)


@dataclass
class _Held:
    """What this process holds for one directory: the locked descriptor, how often it was acquired, and the
    directories the first acquisition created (removed on the last release if they hold nothing else)."""

    fd: int | None
    lock_file: Path
    depth: int = 1
    created: list[Path] = field(default_factory=list)


_HELD: dict[tuple[int, int], _Held] = {}  # (st_dev, st_ino) of the run directory -> what this process holds


def _forget_in_child() -> None:
    """A forked child must not keep the parent's lock alive (flock belongs to the shared open file description)."""
    for held in _HELD.values():
        if held.fd is not None:
            with contextlib.suppress(OSError):
                os.close(held.fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class RunLock:
    """A held run-directory lock (one acquisition); :meth:`release` or ``with`` gives it back."""

    def __init__(self, directory: Path, key: tuple[int, int] | None) -> None:
        self.directory = directory
        self._key = key

    @property
    def held(self) -> bool:
        """True while this acquisition is held with a real ``flock`` (False: no lock on this platform)."""
        return self._key is not None and self._key in _HELD and _HELD[self._key].fd is not None

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None or key not in _HELD:
            return
        held = _HELD[key]
        held.depth -= 1
        if held.depth > 0:
            return
        del _HELD[key]
        _give_back(held)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def acquire(directory: str | Path, command: str | None = None, *, create: bool = True,
            what: str = "run directory") -> RunLock:
    """Take the lock of run directory ``directory`` (created with its parents when ``create``; without it a missing
    directory gets no lock and the caller reports it). Raises :class:`UsageError` (exit 2) naming the holder when
    another process has it; nothing in the directory is changed then. ``what`` names the directory in that message
    (a feature cache's builder lock is the same lock on the cache directory)."""
    directory = Path(directory)
    created: list[Path] = []
    if not directory.is_dir():
        if not create:
            return RunLock(directory, None)
        created = _make_dirs(directory)
    stat = os.stat(directory)
    key = (stat.st_dev, stat.st_ino)
    if key in _HELD:
        _HELD[key].depth += 1
        return RunLock(directory, key)
    lock_file = directory / LOCK_NAME
    fd = _lock(lock_file, directory, created, what)
    _HELD[key] = _Held(fd, lock_file, created=created)
    if fd is not None:
        _write_holder(fd, command)
    return RunLock(directory, key)


@contextlib.contextmanager
def hold(directory: str | Path, command: str | None = None, *, create: bool = True) -> Iterator[RunLock]:
    """``with hold(run_dir, "export"):`` — :func:`acquire` for the block's duration."""
    lock = acquire(directory, command, create=create)
    try:
        yield lock
    finally:
        lock.release()


def holder(directory: str | Path) -> dict | None:
    """What the lock file of ``directory`` says about its holder (pid, host, command, since), or None."""
    try:
        text = (Path(directory) / LOCK_NAME).read_text(encoding="utf-8")
        value = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# --- internals -----------------------------------------------------------------------------------------------


def _make_dirs(directory: Path) -> list[Path]:
    """``mkdir -p``; returns the directories it created, deepest first."""
    missing = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _lock(lock_file: Path, directory: Path, created: list[Path], what: str = "run directory") -> int | None:
    """Open and ``flock`` the lock file; the descriptor, or None where this platform/filesystem has no flock."""
    if fcntl is None:
        log.debug("no fcntl on this platform: %s is not locked against other processes", directory)
        return None
    for _ in range(5):  # a releasing holder may unlink the file between our open and our flock: retry on its new inode
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _remove_created(created)
            raise _refusal(directory, what) from None
        except OSError as exc:  # e.g. ENOLCK/EOPNOTSUPP on some network filesystems
            os.close(fd)
            log.warning(f"cannot lock {lock_file} ({exc.strerror or exc}); two distillctl processes writing into "
                        f"{directory} at once would corrupt it")
            return None
        if _same_file(fd, lock_file):
            return fd
        os.close(fd)
    raise UsageError(f"could not take the lock {lock_file}: it keeps being replaced; is another distillctl process "
                     f"starting and stopping on this {what}?")


def _same_file(fd: int, path: Path) -> bool:
    try:
        mine, current = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino)


def _write_holder(fd: int, command: str | None) -> None:
    """Record who holds the lock, for the message a refused process prints."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or _command_line(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _command_line() -> str:
    """``distillctl run --out …`` as this process was started (shortened)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program in ("__main__.py", "-m", "-c", ""):
        program = "distillctl"
    text = " ".join([program, *sys.argv[1:]])
    return text if len(text) <= 200 else text[:197] + "..."


def _refusal(directory: Path, what: str = "run directory") -> UsageError:
    """The one-line exit-2 error naming the process that holds ``directory``."""
    who = None
    for _ in range(10):  # the holder writes its record just after taking the lock
        who = holder(directory)
        if who is not None:
            break
        time.sleep(0.05)
    if who is None:
        named = "another distillctl process (pid unknown)"
    else:
        named = f"pid {who.get('pid')} on {who.get('host')} ({who.get('command')}, since {who.get('since')})"
    return UsageError(f"{what} {directory} is in use by {named}; wait for it or stop it")


def _give_back(held: _Held) -> None:
    """Release the flock; a directory this lock created and in which nothing else was written goes away again."""
    if held.fd is None:
        return
    try:
        removable = bool(held.created) and _only_lock_file(held.lock_file.parent)
        if removable:
            held.lock_file.unlink(missing_ok=True)  # while still locked: a waiting opener sees a stale inode and retries
        else:
            os.ftruncate(held.fd, 0)  # no stale holder record
    except OSError:
        removable = False
    finally:
        os.close(held.fd)
    if removable:
        _remove_created(held.created)


def _only_lock_file(directory: Path) -> bool:
    try:
        return [entry.name for entry in os.scandir(directory)] == [LOCK_NAME]
    except OSError:
        return False


def _remove_created(created: list[Path]) -> None:
    """Remove the directories an acquisition created, deepest first, as long as they are empty."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:
            return
