"""Build progress on stderr: a Rich bar on a terminal, one plain line every few seconds otherwise (logs, CI)."""

from __future__ import annotations

import time

from distillctl.cli_common import console, is_tty


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class BuildProgress:
    """Counts images done in this session; shows img/s and the ETA of the remaining work."""

    def __init__(self, total: int, already_done: int, enabled: bool, label: str = "cache build",
                 plain_every_s: float = 10.0) -> None:
        self.total = total
        self.done = already_done
        self.session_done = 0
        self.enabled = enabled
        self.label = label
        self.plain_every_s = plain_every_s
        self.started = time.perf_counter()
        self._last_line = self.started
        self._rich = None
        if enabled and is_tty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._rich = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}"),
                                  TimeElapsedColumn(), console=console, transient=False)
            self._task = self._rich.add_task(label, total=total, completed=already_done, rate="", eta="?")
            self._rich.start()

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.session_done / elapsed if elapsed > 0 else 0.0

    def eta_seconds(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None

    def resumed(self, images: int) -> None:
        """Images found already built by an earlier run: count them as done, not as this session's speed."""
        self.done += images
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done)

    def advance(self, images: int) -> None:
        self.done += images
        self.session_done += images
        if not self.enabled:
            return
        eta = self.eta_seconds()
        eta_text = format_duration(eta) if eta is not None else "?"
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, rate=f"{self.rate:,.0f} img/s", eta=eta_text)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.plain_every_s or self.done >= self.total:
            self._last_line = now
            console.print(f"{self.label}: {self.done}/{self.total} images ({100 * self.done / max(1, self.total):.1f}%), "
                          f"{self.rate:,.0f} img/s, ETA {eta_text}", highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
