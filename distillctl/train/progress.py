"""Training progress: metrics.jsonl (+ optional TensorBoard) and a Rich progress bar, on rank 0 only.

On a terminal: a Rich bar. Otherwise (CI logs, files, pipes): plain periodic lines without ANSI codes, each naming
its stage (``[pretrain]`` for a teacher trained first, ``[distill]`` for the student), so counters that restart
between stages say which stage they count. Every metrics.jsonl row carries the stage and a UTC timestamp.
"""

from __future__ import annotations

import json
import math
import time
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
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
        record.setdefault("stage", "train")
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(f"{record.get('stage', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """Rich progress bar with img/s, loss and ETA on a terminal; periodic plain lines otherwise."""

    def __init__(self, stage: str, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = is_tty() and enabled
        self.stage, self.total, self.start = stage, total, start
        self.started = time.monotonic()
        self.bar = None
        if enabled:
            begin = f"from step {start} " if start else ""
            console.print(f"{stage}: training {total} steps {begin}(step counters below count this stage)",
                          highlight=False, markup=False)
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

    def update(self, step: int, loss: float | None, lr: float) -> None:
        """Advance the bar; ``loss`` is read from the device at log steps only (None: keep the last one shown)."""
        if self.bar is not None:
            if loss is None:
                self.bar.update(self.task, completed=step)
            else:
                self.bar.update(self.task, completed=step, loss=loss)

    def log_line(self, step: int, loss: float, lr: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, rate=rate)
        elif self.enabled:
            console.print(plain_line(self.stage, step, self.total, self.start, loss, lr, rate,
                                     time.monotonic() - self.started), highlight=False, markup=False)


def plain_line(stage: str, step: int, total: int, start: int, loss: float, lr: float, rate: float,
               elapsed_s: float) -> str:
    """``[distill] step 40/44 (91%) loss 0.746 lr 0.00611 2,502 img/s elapsed 0:00:12 ETA 0:00:01``."""
    from distillctl.cache.progress import format_duration

    done = max(0, step - start)
    eta = format_duration(elapsed_s / done * (total - step)) if done else "?"
    return (f"[{stage}] step {step}/{total} ({100 * step / max(1, total):.0f}%) loss {loss:.4g} lr {lr:.3g} "
            f"{rate:,.0f} img/s elapsed {format_duration(elapsed_s)} ETA {eta}")
