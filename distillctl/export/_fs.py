"""File-system transactions for export artefacts.

- :func:`write_bytes_atomic`: one file, via ``distillctl._infra.atomic_path`` (temp name in the same dir, fsync,
  rename, fsync of the folder).
- :class:`StagedDirectory`: a whole folder (``<run>/export``), built beside it and swapped in only once complete, so
  an export that fails late (an OpenVINO conversion after the new ONNX was written, a full disk while writing the
  card) leaves the previous export exactly as it was, never new artefacts without their model card and report.
  On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``, so ``final`` exists at every instant; elsewhere (or on a
  file system without it) the old folder is renamed aside first and the new one renamed into place.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from distillctl._infra import atomic_path, fsync_dir

STAGING_PREFIX = ".staging-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(first: str | Path, second: str | Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(..., RENAME_EXCHANGE)``). False where that is not
    available (another OS, an old libc or kernel, a file system that refuses it): the caller then renames in two
    steps. Any other failure raises OSError and changes nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def write_bytes_atomic(destination: str | Path, data: bytes) -> Path:
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)
    return Path(destination)


class StagedDirectory:
    """The new content of ``final`` is built in ``path`` (``<parent>/.staging-<name>-XXXX/<name>``);
    :meth:`commit` swaps it in, :meth:`abort` throws it away and leaves ``final`` untouched.

    The caller must be the only writer of ``final``'s parent (the run-directory lock, ``distillctl.runlock``):
    creating a stage first cleans up the stages a killed process left behind.
    """

    def __init__(self, final: str | Path) -> None:
        self.final = Path(final)
        recover_stale(self.final)
        self.root = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{self.final.name}-", dir=self.final.parent))
        self.path = self.root / self.final.name
        self.path.mkdir()

    def commit(self, then: Callable[[], object] | None = None) -> None:
        """Put the staged folder in place of ``final``, then run ``then`` (the report that describes the new
        folder); if ``then`` raises, the old folder is put back before re-raising. With :func:`exchange` the swap is
        atomic; without it the old folder is set aside first, and a kill between the two renames leaves it in the
        stage, where :func:`recover_stale` finds it."""
        if self.final.is_dir() and exchange(self.path, self.final):  # one atomic swap: the old folder is in the stage
            fsync_dir(self.final.parent)
            try:
                if then is not None:
                    then()
            except BaseException:
                exchange(self.path, self.final)
                fsync_dir(self.final.parent)
                raise
            self.abort()
            return
        old = self.root / f"{self.final.name}.old"
        had_old = self.final.exists()
        if had_old:
            os.rename(self.final, old)
        try:
            os.rename(self.path, self.final)
        except BaseException:
            if had_old:
                os.rename(old, self.final)
            raise
        fsync_dir(self.final.parent)
        try:
            if then is not None:
                then()
        except BaseException:
            os.rename(self.final, self.path)
            if had_old:
                os.rename(old, self.final)
            fsync_dir(self.final.parent)
            raise
        self.abort()  # the old folder went into the stage: both go now

    def abort(self) -> None:
        """Remove the stage (and an old folder a commit set aside); ``final`` is not touched."""
        shutil.rmtree(self.root, ignore_errors=True)


def recover_stale(final: str | Path) -> None:
    """Remove the stages of ``final`` a killed process left, putting back the old folder if the kill came between
    a commit's two renames (``final`` missing, its previous content still in the stage)."""
    final = Path(final)
    for root in sorted(final.parent.glob(f"{STAGING_PREFIX}{final.name}-*")):
        old = root / f"{final.name}.old"
        if old.is_dir() and not final.exists():
            os.rename(old, final)
        shutil.rmtree(root, ignore_errors=True)
