"""The step's loss, method logs and finiteness check, kept on the device until the host truly needs them.

Reading a device tensor on the host (``float(loss)``, ``.item()``, ``if not torch.isfinite(loss)``) waits for every
kernel queued before it: on a GPU, a per-step read stalls the queue once per step. The loop therefore hands each
step's micro-batch losses and logs to :class:`StepValues` as they are and reads them in one transfer only at a
log step (``train.log_every``, and the last step), before a checkpoint, or when a step fails.

Logged values are unchanged: a log row holds the loss and logs *of that step* (not a window mean), averaged over
micro-batches in the same order and precision as before (Python floats from the exact float32 values).

Non-finite losses: each micro-batch loss updates a device-side record of the first non-finite one (its step and
value). Every read raises :class:`TrainingError` naming that step, so a run stops at the next log step or
checkpoint decision, whichever comes first, and no checkpoint or metrics row is ever written after a non-finite
step: the last good checkpoint is kept, and the message and exit code are those of an immediate check.
"""

from __future__ import annotations

import torch

from distillctl.errors import TrainingError

LogValue = torch.Tensor | float


class StepValues:
    """The latest step's losses and logs (device tensors or Python floats) plus the first non-finite loss seen."""

    def __init__(self, device: torch.device, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self._bad_step = torch.full((), -1.0, dtype=torch.float64, device=device)  # -1: every loss finite so far
        self._bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        self._losses: list[torch.Tensor] = []
        self._logs: list[dict[str, LogValue]] = []

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Note one micro-batch loss of ``step`` (no host transfer)."""
        loss = loss.detach()
        first = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step = torch.where(first, float(step), self._bad_step)
        self._bad_loss = torch.where(first, loss.double(), self._bad_loss)

    def set_step(self, losses: list[torch.Tensor], logs: list[dict[str, LogValue]]) -> None:
        """The finished step's micro-batch losses and logs (replacing the previous step's)."""
        self._losses = [loss.detach() for loss in losses]
        self._logs = logs

    def check_finite(self) -> None:
        """Raise if any loss observed so far was non-finite (one transfer of two numbers)."""
        self._raise_if_bad(*torch.stack([self._bad_step, self._bad_loss]).cpu().tolist())

    def read(self) -> tuple[float, dict[str, float]]:
        """(mean loss, mean logs) of the latest step as Python floats, after the finiteness check; one transfer."""
        keys = list(self._logs[0]) if self._logs else []
        tensors = [self._bad_step, self._bad_loss, *self._losses]
        slots: list[list[int | float]] = []  # per micro-batch, per key: an index into tensors, or the float itself
        for logs in self._logs:
            row: list[int | float] = []
            for key in keys:
                value = logs[key]
                if isinstance(value, torch.Tensor):
                    row.append(len(tensors))
                    tensors.append(value.detach().reshape(()).to(self._bad_step.device))
                else:
                    row.append(float(value))
            slots.append(row)
        # float64 holds every float32/bf16/fp16 value exactly, so the floats equal float(tensor) of each
        host = torch.stack([t.double() for t in tensors]).cpu().tolist()
        self._raise_if_bad(host[0], host[1])
        losses = host[2:2 + len(self._losses)]
        per_micro = [[host[v] if isinstance(v, int) else v for v in row] for row in slots]
        if len(losses) == 1:
            return losses[0], dict(zip(keys, per_micro[0])) if per_micro else {}
        logs = {key: sum(row[i] for row in per_micro) / len(per_micro) for i, key in enumerate(keys)}
        return sum(losses) / len(losses), logs

    def raise_pending(self) -> None:
        """After a failed step: if a non-finite loss came first, report that instead (best effort)."""
        try:
            self.check_finite()
        except TrainingError:
            raise
        except Exception:  # noqa: BLE001 - the device may be unusable; the original error is re-raised
            return

    def _raise_if_bad(self, bad_step: float, bad_loss: float) -> None:
        if bad_step < 0:
            return
        step = int(bad_step)
        raise TrainingError(f"non-finite loss ({bad_loss}) at step {step} (epoch {step // self.steps_per_epoch}); "
                            "the last good checkpoint is kept",
                            hint="lower train.lr, enable train.grad_clip, or use train.amp=bf16")
