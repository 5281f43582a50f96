"""One policy for unreadable images, shared by every stage that decodes them.

Training, evaluation (kNN bank and queries, the linear probe's embeddings, INT8 accuracy gates), export
calibration and parity sets, and the feature-cache build all meet the same corrupt or truncated files.
Each of them either *substitutes* the image (training and the cache, whose rows are indexed by image:
a deterministic keyed substitute ``index + k·7919 mod N`` keeps batch sizes and exact resume) or *skips*
it (evaluation and calibration: a substitute would count another image twice). Every stage counts what it
met (:class:`BadImages`), lists the files with their reason, says so on screen in one line, and stops with
exit 2 only when more than ``data.max_bad_fraction`` of the images it read were unreadable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import torch

DEFAULT_MAX_FRACTION = 0.01  # data.max_bad_fraction's default
SUBSTITUTE_ATTEMPTS = 16  # substitutes tried for an unreadable image before giving up on it
_STRIDE = 7919  # a prime: successive substitutes land far apart in the dataset

Entry = tuple[str, str]  # (file or row, reason)


def location(dataset: Any, index: int) -> str:
    """The file behind image ``index`` (or ``row N`` for in-memory datasets)."""
    paths = getattr(dataset, "paths", None)
    return str(paths[index]) if paths is not None else f"row {index}"


def reason(exc: BaseException) -> str:
    """``OSError: Truncated File Read``: the exception's type and first line, at most 200 characters."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def try_load(dataset: Any, index: int) -> tuple[torch.Tensor | None, list[Entry]]:
    """Decode image ``index``; ``(None, [entry])`` when it is unreadable (the *skip* policy)."""
    try:
        return dataset.load_image(index), []
    except Exception as exc:  # noqa: BLE001 -- any decoder failure is a bad image, counted and listed
        return None, [(location(dataset, index), reason(exc))]


def load_or_substitute(dataset: Any, index: int,
                       attempts: int = SUBSTITUTE_ATTEMPTS) -> tuple[int, torch.Tensor | None, list[Entry]]:
    """Decode image ``index`` or, if unreadable, its keyed substitute ``index + k·7919 mod N`` (the
    *substitute* policy); returns (index actually decoded, image or None if every attempt failed, bad entries).

    Deterministic in ``index`` alone, so every rank and every resumed run picks the same substitute."""
    bad: list[Entry] = []
    candidate = index
    for attempt in range(attempts + 1):
        image, entries = try_load(dataset, candidate)
        if image is not None:
            return candidate, image, bad
        bad += entries
        candidate = (index + (attempt + 1) * _STRIDE) % len(dataset)
    return index, None, bad


@dataclass
class BadImages:
    """The unreadable images one stage met (``file → reason``) and what the stage does about them."""

    stage: str  # "train", "eval", "export", "cache": named on screen and in errors
    total: int  # images the stage reads: the denominator of ``max_fraction``
    max_fraction: float = DEFAULT_MAX_FRACTION
    found: dict[str, str] = field(default_factory=dict)

    def add(self, entries: Iterable[Entry]) -> None:
        self.found.update(entries)

    def __len__(self) -> int:
        return len(self.found)

    def gathered(self) -> "BadImages":
        """Every rank's entries merged (a collective under torch.distributed; a copy in one process)."""
        from distillctl.train.distributed import all_gather_object

        merged = BadImages(self.stage, self.total, self.max_fraction)
        for part in all_gather_object(self.found):
            merged.found.update(part)
        return merged

    def check(self, count: int | None = None) -> None:
        """Raise InputError (exit 2) above ``max_fraction``; ``count`` overrides the local count (e.g. a sum
        over ranks)."""
        from distillctl.errors import InputError

        count = len(self) if count is None else count
        if count > self.max_fraction * self.total:
            first = next(iter(sorted(self.found.items())), None)
            detail = f"; first: {first[0]}: {first[1]}" if first else ""
            raise InputError(f"{self.stage}: {count} unreadable images (> {self.max_fraction:.1%} of {self.total})"
                             f"{detail}", hint="fix or remove them, or raise --set data.max_bad_fraction")

    def lines(self) -> list[str]:
        return [f"{where}: {why}" for where, why in sorted(self.found.items())]

    def write(self, path: Path) -> None:
        """The list, one ``file: reason`` per line (written atomically)."""
        from distillctl._infra import atomic_write_text

        atomic_write_text(Path(path), "\n".join(self.lines()) + "\n")

    def report(self, action: Literal["substituted", "skipped"], listed_in: Path | None = None) -> None:
        """One warning line on screen (nothing when there is nothing to report)."""
        if not self.found:
            return
        from distillctl._infra import get_logger

        where, why = next(iter(sorted(self.found.items())))
        listed = f"; listed in {listed_in}" if listed_in is not None else ""
        get_logger(__name__).warning(f"{self.stage}: {len(self)} unreadable image(s) {action} (limit "
                                     f"{self.max_fraction:.1%} of {self.total}){listed}; first: {where}: {why}")

    def finish(self, action: Literal["substituted", "skipped"], list_path: Path | None = None) -> dict[str, Any]:
        """Check the limit, write the list, say so; returns the summary fields a stage records."""
        self.check()
        if not self.found:
            return {"unreadable_images": 0}
        if list_path is not None:
            self.write(list_path)
        self.report(action, list_path)
        return {"unreadable_images": len(self), "unreadable_list": str(list_path.name) if list_path else None,
                "unreadable_action": action}
