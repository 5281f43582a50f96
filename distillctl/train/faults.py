"""Fault handling for training: preemption signals agreed by every rank, out-of-memory messages, and the
fault-injection hooks the kill/resume tests use.

Test hooks (environment variables; never set by users, read once per process):

- ``DISTILLCTL_TEST_KILL_AT_STEP=N``: die with ``os._exit(137)`` right after step N, like ``kill -9``.
- ``DISTILLCTL_TEST_KILL_IN_CHECKPOINT=N``: die half-way through writing the checkpoint of step N
  (the temporary file is left behind, as after a real kill).
- ``DISTILLCTL_TEST_KILL_IN_CACHE_BATCH=N``: die after the N-th batch of a pipeline cache build.
- ``DISTILLCTL_TEST_PAUSE_AT_STEP=N``: after step N write ``<out>/paused.<rank>`` (holding the pid) and
  wait up to 120 s for a signal, so a test can send a real SIGTERM at a known step.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from distillctl.errors import TrainingError
from distillctl.train import distributed

KILL_AT_STEP_ENV = "DISTILLCTL_TEST_KILL_AT_STEP"
KILL_IN_CHECKPOINT_ENV = "DISTILLCTL_TEST_KILL_IN_CHECKPOINT"
KILL_IN_CACHE_BATCH_ENV = "DISTILLCTL_TEST_KILL_IN_CACHE_BATCH"
PAUSE_AT_STEP_ENV = "DISTILLCTL_TEST_PAUSE_AT_STEP"


def env_step(name: str) -> int:
    """The step number a test hook names (0 = unset)."""
    return int(os.environ.get(name, "0") or 0)


class StopFlag:
    """SIGTERM/SIGINT → finish the current step, checkpoint, exit 4.

    Schedulers often signal only some processes (or signal them at slightly different moments), so
    :meth:`agreed` sums the flag over ranks once per step: all ranks stop after the same step.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def pause_for_signal(out_dir: Path, stop: StopFlag, seconds: float = 120.0) -> None:
    """Test hook: announce the pause (file with the pid) and wait until a signal arrives."""
    marker = out_dir / f"paused.{distributed.info().rank}"
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + seconds
    while stop.signal is None and time.monotonic() < deadline:
        time.sleep(0.02)


def oom_error(exc: BaseException, global_batch: int, world: int, grad_accum: int, step: int) -> TrainingError:
    """One actionable line for an out-of-memory step: the batch sizes in play and the flags that change them."""
    per_rank = global_batch // max(world, 1)
    micro = per_rank // max(grad_accum, 1)
    where = "GPU" if torch.cuda.is_available() else "device"
    return TrainingError(
        f"out of {where} memory at step {step}: micro-batch {micro} per process "
        f"(global batch {global_batch} = {world} process(es) x {grad_accum} accumulation step(s) x {micro})",
        hint=f"keep the global batch and raise --set train.grad_accum={grad_accum * 2} "
             f"(micro-batch {micro // 2 if micro > 1 else 1}), or lower --batch-size; --amp bf16 also saves memory",
    )


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
