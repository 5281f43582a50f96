"""The method-agnostic training loop (distillation and SSL pretraining), readable top to bottom.

One step: take this rank's share of the global batch → normalise each view on the device → teacher
outputs (online forward, or cache lookup of the replayed stored view) → student features → method loss →
backward (gradients averaged across ranks) → clip → optimizer step with the step's LR → method state
update (queues, EMA) → metrics, periodic checkpoints, preemption check.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distillctl.cli_common import console, is_tty
from distillctl.data.datasets import ImageDataset
from distillctl.data.views import normalize
from distillctl.errors import InputError, Preempted, TrainingError
from distillctl.methods.base import Method, MethodInputs
from distillctl.teachers.base import Teacher
from distillctl.train import distributed
from distillctl.train.checkpoint import CheckpointManager, capture_rng, restore_rng
from distillctl.train.data import EpochBatchSampler, ViewDataset, collate_views
from distillctl.train.optim import build_optimizer, learning_rate

# Fault injection for tests of kill/resume (documented in tests/; never set by users):
# DISTILLCTL_TEST_KILL_AT_STEP=N → the process dies with os._exit(137) right after step N, like `kill -9`.
_KILL_AT_STEP_ENV = "DISTILLCTL_TEST_KILL_AT_STEP"


@dataclass
class TrainJob:
    """Everything the loop needs; built by the pipeline."""

    method: Method
    student: nn.Module
    dataset: ImageDataset
    out_dir: Path  # checkpoints go to out_dir/checkpoints
    metrics_path: Path
    fingerprint: str
    epochs: int
    batch_size: int  # global
    lr: float
    optimizer: str = "sgd"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    image_size: int = 224
    teacher: Teacher | None = None
    teacher_bn: str = "eval"
    cache: object | None = None  # distillctl.cache.store.FeatureCache in cached mode
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = None
    grad_accum: int = 1
    device: str = "cpu"
    seed: int = 0
    max_steps: int | None = None
    log_every: int = 10
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float | None = 15.0
    keep_last: int = 2
    num_workers: int = 0
    max_bad_fraction: float = 0.01
    resume: bool = True
    stage: str = "distill"
    tensorboard_dir: Path | None = None


@dataclass
class TrainResult:
    steps: int
    epochs: int
    images_seen: int
    images_per_sec: float
    wall_s: float
    final_loss: float
    resumed_from_step: int | None
    bad_images: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "steps": self.steps, "images_seen": self.images_seen,
                "images_per_sec": round(self.images_per_sec, 2), "wall_s": round(self.wall_s, 2),
                "final_loss": self.final_loss, "resumed_from_step": self.resumed_from_step,
                "bad_images": len(self.bad_images)}


class _StopFlag:
    """SIGTERM/SIGINT → finish the current step, checkpoint, exit with the documented code."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopFlag":
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


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train(job: TrainJob) -> TrainResult:
    """Run (or resume) a training stage; returns throughput and step counts."""
    dist_info = distributed.info()
    device = torch.device(job.device)
    method, student = job.method, job.student
    student.to(device)
    method.setup(student)
    method.to(device)
    if job.channels_last:
        student.to(memory_format=torch.channels_last)
    requirements = method.requirements(job.image_size)
    specs = [view.spec for view in requirements.views]
    teacher_slots = [i for i, view in enumerate(requirements.views) if view.teacher]
    student_slots = [i for i, view in enumerate(requirements.views) if view.student]
    if requirements.teacher_mode != "none" and job.teacher is None and job.cache is None:
        raise InputError(f"method {method.name} needs a teacher")
    if job.teacher is not None:
        job.teacher.to(device).freeze()
        job.teacher.set_bn_mode(job.teacher_bn)  # the frozen teacher is never wrapped in DDP

    world = dist_info.world_size
    if job.batch_size % world:
        raise InputError(f"train.batch_size {job.batch_size} must be divisible by the world size {world}")
    steps_per_epoch = len(job.dataset) // job.batch_size
    if steps_per_epoch < 1:
        raise InputError(f"dataset has {len(job.dataset)} images, fewer than one batch of {job.batch_size}",
                         hint="lower train.batch_size")
    total_steps = job.epochs * steps_per_epoch
    last_step = min(total_steps, job.max_steps) if job.max_steps else total_steps
    warmup_steps = int(round(job.warmup_epochs * steps_per_epoch))

    parameters = list(student.parameters()) + method.trainable_parameters()
    optimizer = build_optimizer(job.optimizer, parameters, job.lr, job.weight_decay, job.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=(job.amp == "fp16"))
    forward_student = torch.compile(student) if job.compile else student

    checkpoints = CheckpointManager(job.out_dir / "checkpoints", job.keep_last)
    step, resumed_from = 0, None
    state = checkpoints.load_latest(job.fingerprint) if job.resume else None
    if state is not None:
        student.load_state_dict(state["student"])
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        step = resumed_from = int(state["step"])
        if dist_info.is_main:
            console.print(f"resuming {job.stage} from step {step}/{last_step}")

    def save_checkpoint() -> None:
        if dist_info.is_main:
            checkpoints.save({
                "fingerprint": job.fingerprint, "step": step, "student": student.state_dict(),
                "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": capture_rng(), "world_size": world,
            }, step)
        distributed.barrier()

    metrics = MetricsWriter(job.metrics_path, job.tensorboard_dir, enabled=dist_info.is_main)
    kill_at = int(os.environ.get(_KILL_AT_STEP_ENV, "0") or 0)
    bad_images: list[str] = []
    images_seen, last_loss = 0, float("nan")
    start_time = last_ckpt_time = time.monotonic()
    log_time, log_images = start_time, 0
    progress = _Progress(job.stage, last_step, step, enabled=dist_info.is_main)
    student.train()
    method.train()

    with _StopFlag() as stop, progress:
        while step < last_step:
            epoch = step // steps_per_epoch
            method.on_epoch_start(epoch)
            view_data = ViewDataset(job.dataset, specs, job.seed, epoch,
                                    cache=job.cache, cached_slots=teacher_slots if job.cache is not None else ())
            sampler = EpochBatchSampler(len(job.dataset), job.batch_size, job.seed, epoch,
                                        start_step=step - epoch * steps_per_epoch,
                                        rank=dist_info.rank, world_size=world)
            loader = torch.utils.data.DataLoader(view_data, batch_sampler=sampler, num_workers=job.num_workers,
                                                 collate_fn=collate_views, persistent_workers=False)
            for batch, bad in loader:
                bad_images.extend(f"{job.dataset.paths[i] if job.dataset.paths else i}: {why}" for i, why in bad)
                if len(bad_images) > job.max_bad_fraction * len(job.dataset) and bad_images:
                    raise InputError(f"{len(bad_images)} unreadable images (> {job.max_bad_fraction:.1%} of the data); "
                                     f"first: {bad_images[0]}", hint="fix the data or raise data.max_bad_fraction")
                if batch is None:
                    step += 1
                    continue
                views_uint8, _labels, index, stored = batch
                lr = learning_rate(step, total_steps, job.lr, warmup_steps, job.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = [_to_device(normalize(v.to(device, non_blocking=True), job.mean, job.std), job.channels_last)
                          for v in views_uint8]
                teacher_outputs = _teacher_outputs(job, requirements, images, teacher_slots, index, stored, device)
                with _autocast(device, job.amp):
                    features = [forward_student(images[i]) for i in student_slots]
                    inputs = MethodInputs(student_features=features, teacher_outputs=teacher_outputs, images=images,
                                          index=index.to(device), epoch=step / steps_per_epoch, step=step,
                                          total_epochs=job.epochs, student=student)
                    loss, logs = method.loss(inputs)
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite loss ({float(loss)}) at step {step} (epoch {epoch}); "
                                        "the last good checkpoint is kept",
                                        hint="lower train.lr, enable train.grad_clip, or use train.amp=bf16")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                _average_gradients(parameters)
                if job.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(parameters, job.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                method.after_step(inputs)
                step += 1
                last_loss = float(distributed.all_reduce_mean(loss.detach().float()))
                batch_images = index.shape[0] * world
                images_seen += batch_images
                log_images += batch_images
                progress.update(step, last_loss, lr)
                if step % job.log_every == 0 or step == last_step:
                    now = time.monotonic()
                    rate = log_images / max(now - log_time, 1e-9)
                    metrics.write({"stage": job.stage, "step": step, "epoch": round(step / steps_per_epoch, 4),
                                   "loss": last_loss, "lr": lr, "img_per_s": round(rate, 2),
                                   **{k: round(v, 6) for k, v in logs.items()}})
                    progress.log_line(step, last_loss, lr, rate)
                    log_time, log_images = now, 0
                due_steps = job.checkpoint_every_steps and step % job.checkpoint_every_steps == 0
                due_time = job.checkpoint_every_minutes and time.monotonic() - last_ckpt_time > 60 * job.checkpoint_every_minutes
                if (due_steps or due_time) and step < last_step:
                    save_checkpoint()
                    last_ckpt_time = time.monotonic()
                if kill_at and step == kill_at:
                    os._exit(137)
                if stop.signal is not None:
                    save_checkpoint()
                    raise Preempted(f"received signal {stop.signal}; checkpoint written at step {step}",
                                    hint="resubmit the same command with --resume")
                if step >= last_step:
                    break
    metrics.close()
    wall = time.monotonic() - start_time
    save_checkpoint()
    return TrainResult(steps=step, epochs=job.epochs, images_seen=images_seen,
                       images_per_sec=images_seen / max(wall, 1e-9), wall_s=wall, final_loss=last_loss,
                       resumed_from_step=resumed_from, bad_images=bad_images)


def _to_device(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _teacher_outputs(job: TrainJob, requirements, images, teacher_slots, index, stored, device):
    outputs: list[dict[str, torch.Tensor] | None] = [None] * len(images)
    for slot in teacher_slots:
        if job.cache is not None:
            looked_up = job.cache.lookup(index, stored[:, slot])
            outputs[slot] = {key: looked_up[key].to(device) for key in requirements.teacher_outputs}
        else:
            with torch.no_grad(), _autocast(device, job.amp):
                result = job.teacher.forward(images[slot], requirements.teacher_outputs)
            outputs[slot] = {key: value.float() for key, value in result.items()}
    return outputs


def _average_gradients(parameters: list[nn.Parameter]) -> None:
    """All-reduce gradients (mean) across ranks: one explicit sync instead of a DDP wrapper, so the
    student, the method's heads and anything else trainable stay plain modules (and the frozen
    teacher is never wrapped)."""
    if not distributed.is_distributed():
        return
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


class _Progress:
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
