"""Downloading teacher files: resumable HTTPS with retries, sha256 verification, TOFU lock, mirrors.

Authors publish no sha256 for any of these files (MoCo/MAE give md5 prefixes), so an unpinned
entry is trusted on first use: its sha256 goes into ``$DISTILLCTL_HOME/lock.json`` and every later
fetch, import or load must match it (GateError, exit 3). A file that fails verification is moved
to ``<name>.rejected`` and never left where a later run would trust it.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

from distillctl._infra import atomic_write_text
from distillctl.errors import GateError, InputError

if TYPE_CHECKING:
    from distillctl.teachers.registry import TeacherEntry

log = logging.getLogger("distillctl.teachers")
CHUNK = 1 << 20


def cache_home() -> Path:
    """``$DISTILLCTL_HOME``, else ``$XDG_CACHE_HOME/distillctl``, else ``~/.cache/distillctl``."""
    if os.environ.get("DISTILLCTL_HOME"):
        return Path(os.environ["DISTILLCTL_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "distillctl"


def teacher_dir(name: str) -> Path:
    """Per-teacher folder: files share basenames across teachers (resnet50.pth, checkpoint_teacher.pth)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return cache_home() / "teachers" / safe


def offline_requested() -> bool:
    return any(os.environ.get(var, "") not in ("", "0") for var in ("DISTILLCTL_OFFLINE", "HF_HUB_OFFLINE"))


def mirrored(url: str, mirror: str | None) -> str:
    """Replace scheme and host of ``url`` by the mirror base (``--mirror`` or ``DISTILLCTL_MIRROR``)."""
    base = mirror or os.environ.get("DISTILLCTL_MIRROR") or ""
    if not base:
        return url
    parts = urllib.parse.urlsplit(url)
    return base.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def entry_urls(entry: TeacherEntry, mirror: str | None) -> list[str]:
    """Sources in order; with a mirror configured only the mirrored URLs are tried (air-gapped sites)."""
    if mirror or os.environ.get("DISTILLCTL_MIRROR"):
        return [mirrored(source.url, mirror) for source in entry.sources + entry.mirrors]
    return [source.url for source in entry.sources + entry.mirrors]


# --- hashing ----------------------------------------------------------------------------------

def file_digests(path: Path) -> tuple[str, str]:
    """(sha256, md5) of a file in one pass; md5 only to compare with the authors' published prefixes."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digests(path)[0]


@contextmanager
def teacher_lock(folder: Path) -> Iterator[None]:
    """Serialise fetch/convert of one teacher across processes (e.g. every torchrun rank loading it)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as guard:
        try:
            import fcntl

            fcntl.flock(guard, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX: no cross-process lock
            pass
        yield


# --- lock file --------------------------------------------------------------------------------

def lock_path() -> Path:
    return cache_home() / "lock.json"


def read_lock() -> dict[str, dict]:
    path = lock_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GateError(f"teacher lock file {path} is unreadable ({exc}); refusing to trust any unpinned teacher",
                        hint="restore it from a backup or delete it to re-trust on next download") from None
    return data.get("teachers", {}) if isinstance(data, dict) else {}


def record_lock(name: str, sha256: str, size: int, url: str, filename: str) -> None:
    """Record a trust-on-first-use hash (atomic write, serialised with an flock where available)."""
    path = lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".json.lock"), "a") as guard:
        try:
            import fcntl

            fcntl.flock(guard, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        teachers = read_lock()
        teachers[name] = {"sha256": sha256, "size": size, "url": url, "filename": filename,
                          "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_text(path, json.dumps({"version": 1, "teachers": teachers}, indent=2, sort_keys=True))




@dataclass
class Expected:
    """What a file must hash to, and why we believe it."""

    sha256: str | None
    origin: str  # "--sha256" | "registry" | "lock" | "none"
    md5_prefix: str | None = None
    size: int | None = None
    sha256_prefix: str | None = None  # published in the file name (torch.hub convention, e.g. DINOv3)


def expected_hash(name: str, pinned: str | None, user_sha256: str | None, md5_prefix: str | None = None,
                  size: int | None = None) -> Expected:
    """``--sha256`` beats the registry pin, which beats the TOFU lock."""
    if user_sha256:
        value = user_sha256.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            from distillctl.errors import UsageError

            raise UsageError(f"--sha256 must be 64 hex digits, got '{user_sha256}'")
        return Expected(value, "--sha256", md5_prefix, size)
    if pinned:
        return Expected(pinned, "registry", md5_prefix, size)
    locked = read_lock().get(name)
    if locked:
        return Expected(locked["sha256"], "lock", md5_prefix, locked.get("size"))
    return Expected(None, "none", md5_prefix, size)


def check_file(path: Path, name: str, expected: Expected, no_verify: bool) -> str:
    """Hash ``path`` and enforce ``expected``; on mismatch move it to ``.rejected`` and exit 3."""
    sha, md5 = file_digests(path)
    size = path.stat().st_size
    problems = []
    if expected.sha256 and sha != expected.sha256:
        problems.append(f"sha256 {sha} != {expected.sha256} (from {expected.origin})")
    if expected.sha256_prefix and not sha.startswith(expected.sha256_prefix):
        problems.append(f"sha256 {sha[:len(expected.sha256_prefix)]}… != published prefix {expected.sha256_prefix}")
    if expected.md5_prefix and not md5.startswith(expected.md5_prefix):
        problems.append(f"md5 {md5[:len(expected.md5_prefix)]}… != published prefix {expected.md5_prefix}")
    if expected.size is not None and size != expected.size and not problems:
        problems.append(f"size {size} != {expected.size} bytes")
    if problems and no_verify:
        log.warning("teacher %s: --no-verify: ignoring %s", name, "; ".join(problems))
        return sha
    if problems:
        rejected = path.with_name(path.name.removesuffix(".part") + ".rejected")
        os.replace(path, rejected)
        raise GateError(f"teacher '{name}': {path.name} failed verification: {'; '.join(problems)}",
                        hint=f"the file was moved to {rejected}; re-download, or pin the right hash with --sha256")
    return sha


# --- HTTP -------------------------------------------------------------------------------------

class _Unreachable(Exception):
    """No route to the host (refused, DNS, unreachable, timeout): not worth retrying."""


def _timeout() -> float:
    return float(os.environ.get("DISTILLCTL_HTTP_TIMEOUT", "30"))


def _is_unreachable(reason: object) -> bool:
    if isinstance(reason, (ConnectionRefusedError, socket.gaierror, socket.timeout, TimeoutError)):
        return True
    return isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED)


def download(url: str, dest: Path, retries: int = 4, progress: bool = True) -> None:
    """Download ``url`` into ``dest`` (resuming ``dest`` if it holds a prefix); HTTP Range, retries."""
    delay = 0.5
    for attempt in range(retries + 1):
        try:
            _download_once(url, dest, progress)
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and dest.exists():  # our partial file is useless to this server
                dest.unlink()
            elif exc.code < 500 and exc.code not in (408, 429):
                raise InputError(f"download failed: HTTP {exc.code} {exc.reason} for {url}") from None
            error: object = f"HTTP {exc.code}"
        except urllib.error.URLError as exc:
            if _is_unreachable(exc.reason):
                raise _Unreachable(str(exc.reason)) from None
            error = exc.reason
        except (socket.timeout, TimeoutError) as exc:
            if not dest.exists() or dest.stat().st_size == 0:
                raise _Unreachable(f"timed out after {_timeout():.0f}s") from None
            error = exc
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            error = exc
        if attempt == retries:
            raise InputError(f"download of {url} kept failing ({error}) after {retries + 1} attempts",
                             hint="rerun the same command to resume where it stopped")
        log.info("download of %s interrupted (%s); retry %d/%d with resume", url, error, attempt + 1, retries)
        time.sleep(delay)
        delay = min(delay * 2, 8.0)


def _download_once(url: str, dest: Path, progress: bool) -> None:
    have = dest.stat().st_size if dest.exists() else 0
    headers = {"User-Agent": "distillctl"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=_timeout()) as response:
        if have and response.status != 206:
            have = 0  # server ignored Range: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if have else "wb"
        with open(dest, mode) as handle, _progress(dest.name, total, have, progress) as advance:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                handle.write(chunk)
                advance(len(chunk))
    size = dest.stat().st_size
    if total is not None and size != total:
        raise http.client.IncompleteRead(b"", total - size)


class _progress:
    """A Rich download bar on stderr (only on a terminal); yields an ``advance(n)`` callable."""

    def __init__(self, label: str, total: int | None, done: int, enabled: bool) -> None:
        from distillctl.cli_common import console

        self.bar = None
        if enabled and console.is_terminal:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                console=console, transient=True)
            self.task = self.bar.add_task(label, total=total, completed=done)

    def __enter__(self):
        if self.bar is None:
            return lambda n: None
        self.bar.__enter__()
        return lambda n: self.bar.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _validated(path: Path, validate: Callable[[Path], None] | None) -> None:
    """Run the structural check on a not-yet-trusted file; a file that fails it is moved aside."""
    if validate is None:
        return
    try:
        validate(path)
    except Exception:
        os.replace(path, path.with_name(path.name.removesuffix(".part") + ".rejected"))
        raise


def fetch_urls(name: str, urls: list[str], dest: Path, expected: Expected, *, no_verify: bool = False,
               progress: bool = True, validate: Callable[[Path], None] | None = None) -> str:
    """Make ``dest`` exist and verified: download (resuming ``dest.part``) from the first URL that
    answers, check its hash and ``validate`` it, rename into place; record TOFU when nothing was
    expected. Returns sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        sha = check_file(dest, name, expected, no_verify)
        _validated(dest, validate)
    else:
        if offline_requested():
            raise offline_error(name, urls[0], "offline mode (DISTILLCTL_OFFLINE / HF_HUB_OFFLINE)")
        part = dest.with_name(dest.name + ".part")
        failures: list[tuple[str, str, bool]] = []  # (url, why, unreachable)
        for url in urls:
            try:
                download(url, part, progress=progress)
                break
            except _Unreachable as exc:
                failures.append((url, str(exc), True))
            except InputError as exc:
                failures.append((url, exc.message, False))
        else:
            if all(unreachable for _, _, unreachable in failures):
                raise offline_error(name, failures[0][0], failures[0][1])
            raise InputError(f"teacher '{name}': no source worked: " + "; ".join(why for _, why, _ in failures),
                             hint=_import_hint(name, failures[0][0]))
        sha = check_file(part, name, expected, no_verify)
        _validated(part, validate)
        os.replace(part, dest)
    if no_verify:
        log.warning("teacher %s: verification disabled by --no-verify (sha256 %s)", name, sha)
    elif expected.sha256 is None:
        record_lock(name, sha, dest.stat().st_size, urls[0], dest.name)
        log.warning("teacher %s: sha256 not published; pinned %s… on first use in %s", name, sha[:16], lock_path())
    return sha


def import_file(name: str, source: Path, dest: Path, expected: Expected, *, no_verify: bool = False,
                validate: Callable[[Path], None] | None = None) -> str:
    """Copy a user-supplied file into the cache (air-gapped install), verifying it like a download."""
    if not source.is_file():
        raise InputError(f"file not found: {source}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    shutil.copyfile(source, part)
    sha = check_file(part, name, expected, no_verify)
    _validated(part, validate)
    os.replace(part, dest)
    if not no_verify and expected.sha256 is None:
        record_lock(name, sha, dest.stat().st_size, f"import:{source.resolve()}", dest.name)
        log.warning("teacher %s: sha256 not published; pinned %s… on first use in %s", name, sha[:16], lock_path())
    return sha


def _import_hint(name: str, url: str) -> str:
    return f"download {url} on a connected machine, then run: distillctl teacher import {name} FILE"


def offline_error(name: str, url: str, reason: str) -> InputError:
    return InputError(f"cannot download teacher '{name}' from {url} ({reason})", hint=_import_hint(name, url))
