"""File-system transactions for export artefacts.

- :func:`write_bytes_atomic`: one file, via ``distillctl._infra.atomic_path`` (temp name in the same dir, fsync,
  rename, fsync of the folder).
- :class:`StagedDirectory`: a whole folder (``<run>/export``), built beside it and swapped in only once complete, so
  an export that fails late (an OpenVINO conversion after the new ONNX was written, a full disk while writing the
  card) leaves the previous export exactly as it was, never new artefacts without their model card and report.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from distillctl._infra import atomic_path, fsync_dir

STAGING_PREFIX = ".staging-"


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
        """Put the staged folder in place of ``final`` (the old one set aside first), then run ``then`` (the
        report that describes the new folder); if ``then`` raises, the old folder is put back before re-raising.
        Between the two renames a kill leaves the old folder in the stage, where :func:`recover_stale` finds it."""
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
