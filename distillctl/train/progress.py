"""Training progress: metrics.jsonl (+ optional TensorBoard) and a Rich progress bar, on rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path

from distillctl.cli_common import console, is_tty
from distillctl.errors import InputError


class MetricsWriter:
    def __init__(self, path: Path, tensorboard_dir: Path | None, enabled: bool) -> None:
        self.enabled = enabled
        self.path = path
        self.tb = None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("--tensorboard needs the tensorboard package",
                                 hint="pip install 'distillctl[tensorboard]'") from None
            self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step",):
                    self.tb.add_scalar(f"{record.get('stage', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """Rich progress bar with img/s, loss and ETA on a terminal; periodic plain lines otherwise."""

    def __init__(self, stage: str, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = is_tty() and enabled
        self.stage, self.total = stage, total
        self.bar = None
        if self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} img/s"),
                                TimeRemainingColumn(), console=console, transient=False)
            self.task = self.bar.add_task(stage, total=total, completed=start, loss=math.nan, rate=0.0)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss)

    def log_line(self, step: int, loss: float, lr: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, rate=rate)
        elif self.enabled:
            console.print(f"[{self.stage}] step {step}/{self.total} loss {loss:.4f} lr {lr:.4g} {rate:.0f} img/s",
                          highlight=False)
