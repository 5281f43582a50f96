"""The method-agnostic training loop (distillation and SSL pretraining), readable top to bottom.

One step: take this rank's share of the global batch → split it into ``grad_accum`` micro-batches → for
each: normalise the views → teacher outputs (online forward, or cache lookup of the replayed stored view)
→ student features and taps (same-resolution views grouped where the method asks, see ``train/forward.py``)
→ method loss / grad_accum → backward; then average gradients across ranks (one
explicit all-reduce, no DDP wrapper: the frozen teacher is never wrapped) → clip → optimizer step with the
step's LR → method state update (queues, EMA) on the whole per-rank batch → one small all-reduce that
agrees on a preemption signal and a due wall-time checkpoint → metrics, checkpoints.

No per-step host synchronisation: the loss, the method's logs and the finiteness check stay on the device
(``train/step_values.py``) and are read in one transfer at log steps and before checkpoints only.

Global batch = ``batch_size`` whatever the world size: per process ``batch_size / world``, in
``grad_accum`` micro-batches. Under DDP each rank sees the same global batches a single process would,
so with ``sync_bn`` (BatchNorm statistics over the global batch) the result equals a 1-process run up
to float rounding; without it, N ranks equal one process with ``grad_accum = N`` (per-micro-batch BN).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distillctl._infra import get_logger
from distillctl.config import DataConfig, TrainConfig
from distillctl.data.bad_images import BadImages
from distillctl.data.datasets import ImageDataset
from distillctl.data.views import normalize
from distillctl.errors import InputError, Preempted
from distillctl.methods.base import Method, MethodInputs, Requirements
from distillctl.taps import TapRecorder, check_taps
from distillctl.teachers.base import Teacher
from distillctl.train import distributed, faults
from distillctl.train.checkpoint import CheckpointManager, capture_rng, restore_rng
from distillctl.methods.collapse import CollapseWatch
from distillctl.train.data import DecodedImages, EpochBatchSampler, ViewDataset, collate_views
from distillctl.train.forward import autocast, merge_inputs, student_forward, teacher_outputs
from distillctl.train.optim import build_optimizer, learning_rate
from distillctl.train.progress import MetricsWriter, Progress
from distillctl.train.step_values import StepValues
from distillctl.train.syncbn import convert_sync_batchnorm
from distillctl.train.threads import apply_threads

log = get_logger(__name__)


@dataclass
class TrainJob:
    """What the loop needs: the recipe's ``train`` and ``data`` sections as they are, plus what the pipeline
    built (method, student, dataset, teacher or cache, resolved normalisation and device, paths)."""

    method: Method
    student: nn.Module
    dataset: ImageDataset
    train: TrainConfig  # recipe.train: schedule, optimiser, batch, AMP, checkpoints, seed
    data: DataConfig  # recipe.data: image_size, num_workers, max_bad_fraction
    out_dir: Path  # checkpoints go to out_dir/checkpoints
    metrics_path: Path
    fingerprint: str
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # resolved (recipe data.mean may defer to the teacher)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    device: str = "cpu"  # resolved (recipe train.device may say auto)
    teacher: Teacher | None = None
    teacher_bn: str = "eval"
    cache: object | None = None  # distillctl.cache.store.FeatureCache in cached mode
    bags: object | None = None  # (N, k) teacher-kNN neighbour table for methods with neighbour views (BINGO)
    resume: bool = True  # continue from the newest loadable matching checkpoint, if any
    require_resume: bool = False  # --resume: no loadable checkpoint is an error, not a fresh start
    stage: str = "distill"
    tensorboard_dir: Path | None = None

    @property
    def lr(self) -> float:
        """Peak learning rate: ``train.lr``, times global batch / 256 with ``train.lr_scaling: linear``."""
        scale = self.train.batch_size / 256 if self.train.lr_scaling == "linear" else 1.0
        return self.train.lr * scale


@dataclass
class TrainResult:
    steps: int
    epochs: int
    images_seen: int
    images_per_sec: float
    wall_s: float  # this invocation's training time
    final_loss: float
    resumed_from_step: int | None
    # training time of every invocation that led to the final step (each step counted once: steps re-run after an
    # interruption replace the lost ones); None when resumed from a checkpoint that predates this field
    total_wall_s: float | None = None
    world_size: int = 1
    grad_accum: int = 1
    sync_bn: bool = False
    bad_images: list[str] = field(default_factory=list)
    threads: dict = field(default_factory=dict)  # the intra-op thread choice (train/threads.py)
    collapse: dict | None = None  # the first collapsed log step (methods/collapse.py), None if none was seen

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "steps": self.steps, "images_seen": self.images_seen,
                "images_per_sec": round(self.images_per_sec, 2), "wall_s": round(self.wall_s, 2),
                "total_wall_s": None if self.total_wall_s is None else round(self.total_wall_s, 2),
                "final_loss": self.final_loss, "resumed_from_step": self.resumed_from_step,
                "world_size": self.world_size, "grad_accum": self.grad_accum, "sync_bn": self.sync_bn,
                "bad_images": len(self.bad_images), "threads": self.threads, "collapse": self.collapse}


def planned_steps(steps_per_epoch: int, epochs: int, max_steps: int | None) -> int:
    """The step a run ends at: ``epochs`` epochs, capped by ``max_steps`` when set."""
    total = epochs * steps_per_epoch
    return min(total, max_steps) if max_steps else total


def batch_split(global_batch: int, world: int, grad_accum: int) -> tuple[int, int]:
    """(per-process batch, micro-batch); the global batch never depends on the world size."""
    if global_batch % world:
        raise InputError(f"train.batch_size {global_batch} must be divisible by the world size {world}",
                         hint=f"use a multiple of {world}, or another number of processes")
    per_rank = global_batch // world
    if per_rank % grad_accum:
        raise InputError(f"the per-process batch {per_rank} (= {global_batch} / {world} processes) is not divisible "
                         f"by train.grad_accum={grad_accum}", hint="choose grad_accum dividing batch_size / world size")
    return per_rank, per_rank // grad_accum


def train(job: TrainJob) -> TrainResult:
    """Run (or resume) a training stage; returns throughput and step counts."""
    threads = apply_threads(job.train.threads, job.data.num_workers)  # idempotent; direct callers get it too
    dist_info = distributed.info()
    device = torch.device(distributed.local_device(job.device))
    world = dist_info.world_size
    per_rank, micro = batch_split(job.train.batch_size, world, job.train.grad_accum)
    method, student = job.method, job.student
    student.to(device)
    if job.train.sync_bn and world > 1:
        convert_sync_batchnorm(student, device.type)
    method.num_samples = len(job.dataset)  # for per-sample state created in setup()
    method.setup(student)
    method.to(device)
    if job.train.sync_bn and world > 1:
        convert_sync_batchnorm(method, device.type)
    if job.train.channels_last:
        student.to(memory_format=torch.channels_last)
    requirements = method.requirements(job.data.image_size)
    specs = [view.spec for view in requirements.views]
    teacher_slots = [i for i, view in enumerate(requirements.views) if view.teacher]
    student_slots = [i for i, view in enumerate(requirements.views) if view.student]
    neighbour_slots = _neighbour_slots(requirements)
    if neighbour_slots and job.bags is None:
        raise InputError(f"method {method.name} shows teacher-kNN neighbours but no bag table was built")
    if requirements.teacher_mode != "none" and job.teacher is None and job.cache is None:
        raise InputError(f"method {method.name} needs a teacher")
    co_trained = _check_teacher_mode(method.name, requirements, job)
    check_taps(student, requirements.student_taps, f"method {method.name}, student")
    if job.teacher is not None:
        check_taps(job.teacher.backbone, requirements.teacher_taps, f"method {method.name}, teacher")
        job.teacher.to(device)
        if co_trained:  # trained with the student: gradients, train-mode BN, its own optimiser group
            job.teacher.unfreeze().set_bn_mode("train")
            if job.train.sync_bn and world > 1:  # its BatchNorm over the global batch, like the student's
                for part in job.teacher.parts().values():
                    convert_sync_batchnorm(part, device.type)
        else:
            job.teacher.freeze()
            job.teacher.set_bn_mode(job.teacher_bn)  # the frozen teacher is never wrapped in DDP

    steps_per_epoch = len(job.dataset) // job.train.batch_size
    if steps_per_epoch < 1:
        raise InputError(f"dataset has {len(job.dataset)} images, fewer than one batch of {job.train.batch_size}",
                         hint="lower train.batch_size")
    total_steps = job.train.epochs * steps_per_epoch
    last_step = planned_steps(steps_per_epoch, job.train.epochs, job.train.max_steps)
    warmup_steps = int(round(job.train.warmup_epochs * steps_per_epoch))

    distributed.broadcast_module(student)
    distributed.broadcast_module(method)
    parameters = list(student.parameters()) + method.trainable_parameters()
    groups: list = parameters
    if co_trained:
        for part in job.teacher.parts().values():
            distributed.broadcast_module(part)
        teacher_parameters = job.teacher.parameters()
        groups = [{"params": parameters},
                  {"params": teacher_parameters, "lr_scale": requirements.teacher_lr_scale,
                   "weight_decay": job.train.weight_decay if requirements.teacher_weight_decay is None
                   else requirements.teacher_weight_decay}]
        parameters = parameters + teacher_parameters  # averaged across ranks and clipped with the student's
    optimizer = build_optimizer(job.train.optimizer, groups, job.lr, job.train.weight_decay, job.train.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=(job.train.amp == "fp16"))
    forward_student = torch.compile(student) if job.train.compile else student
    student_taps = TapRecorder(student, requirements.student_taps)  # hooks only while training runs

    checkpoints = CheckpointManager(job.out_dir / "checkpoints", job.train.keep_last)
    step, resumed_from = 0, None
    prior_wall: float | None = 0.0  # training seconds spent before this invocation (from the checkpoint)

    def total_wall(now: float) -> float | None:  # training seconds of every invocation up to ``now``
        return None if prior_wall is None else prior_wall + now - start_time
    bad_images: dict[str, str] = {}  # path → reason (this rank's; rank 0 also holds those restored from a checkpoint)
    watch = CollapseWatch()
    state = distributed.main_first(checkpoints.load_latest, job.fingerprint) if job.resume else None
    state = distributed.broadcast_object(state) if job.resume else None  # other nodes need no shared filesystem
    if state is None and job.require_resume:
        raise InputError(f"--resume: no loadable checkpoint in {checkpoints.directory}",
                         hint="drop --resume to start over (unreadable checkpoints are kept for inspection)")
    if state is not None:
        _restore(state, student, method, optimizer, scaler, dist_info, job.teacher if co_trained else None)
        step = resumed_from = int(state["step"])
        prior_wall = state.get("train_wall_s")
        watch.load_state_dict(state.get("collapse"))
        if dist_info.is_main:
            bad_images.update(dict(state.get("bad_images", [])))
            was = int(state.get("world_size", world))
            log.info(f"resuming {job.stage} from step {step}/{last_step}"
                     + (f" (checkpoint written by {was} processes, now {world})" if was != world else ""))

    values = StepValues(device, steps_per_epoch)

    def save_checkpoint() -> None:
        values.check_finite()  # never checkpoint after a non-finite step
        rngs = distributed.all_gather_object(capture_rng())
        gathered: dict[str, str] = {}
        for part in distributed.all_gather_object(bad_images):
            gathered.update(part)
        distributed.main_first(checkpoints.save, {
            "fingerprint": job.fingerprint, "step": step, "student": student.state_dict(),
            "method": method.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "rng": rngs, "world_size": world,
            "bad_images": sorted(gathered.items()),
            "train_wall_s": total_wall(time.monotonic()), "collapse": watch.state_dict(),
            **({"teacher": job.teacher.state_dict()} if co_trained else {}),
        }, step)

    metrics = MetricsWriter(job.metrics_path, job.tensorboard_dir, enabled=dist_info.is_main)
    kill_at = faults.env_step(faults.KILL_AT_STEP_ENV)
    pause_at, pause_rank = _pause_hook()
    images_seen, last_loss = 0, float("nan")
    start_time = last_ckpt_time = time.monotonic()
    log_time, log_images, log_cpu = start_time, 0, time.process_time()
    progress = Progress(job.stage, last_step, step, enabled=dist_info.is_main)
    student.train()
    method.train()

    # decode each image once (in-process loader, datasets read from files; in-memory arrays need no decoding)
    decoded = DecodedImages(job.data.decode_cache_mb << 20) if (
        job.data.num_workers == 0 and job.data.decode_cache_mb and getattr(job.dataset, "arrays", None) is None) else None
    with faults.StopFlag() as stop, progress, student_taps:
        while step < last_step:
            epoch = step // steps_per_epoch
            method.on_epoch_start(epoch)
            view_data = ViewDataset(job.dataset, specs, job.train.seed, epoch,
                                    cache=job.cache, cached_slots=teacher_slots if job.cache is not None else (),
                                    neighbour_slots=neighbour_slots, bags=job.bags, decoded=decoded)
            sampler = EpochBatchSampler(len(job.dataset), job.train.batch_size, job.train.seed, epoch,
                                        start_step=step - epoch * steps_per_epoch,
                                        rank=dist_info.rank, world_size=world)
            loader = torch.utils.data.DataLoader(view_data, batch_sampler=sampler, num_workers=job.data.num_workers,
                                                 collate_fn=collate_views, persistent_workers=False)
            for batch, bad in loader:
                bad_images.update(bad)
                if batch is None:
                    raise InputError(f"a whole batch of images (and their substitutes) is unreadable at step {step}; "
                                     f"first: {next(iter(bad_images.items()), ('?', ''))}",
                                     hint="check the data; distillctl skips isolated corrupt files only")
                lr = learning_rate(step, total_steps, job.lr, warmup_steps, job.train.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                optimizer.zero_grad(set_to_none=True)
                try:
                    inputs = _accumulate(job, batch, requirements, teacher_slots, student_slots, forward_student,
                                         student_taps, scaler, device, step, steps_per_epoch, values, co_trained)
                    _average_gradients(parameters)
                    if job.train.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(parameters, job.train.grad_clip)
                    scaler.step(optimizer)  # (with amp=fp16, torch's GradScaler reads its inf flag here)
                    scaler.update()
                    method.after_step(inputs)
                except Exception as exc:
                    if faults.is_oom(exc):
                        raise faults.oom_error(exc, job.train.batch_size, world, job.train.grad_accum, step) from None
                    values.raise_pending()  # a non-finite loss that came first is the error to report
                    raise
                step += 1
                if pause_at and step == pause_at and pause_rank in (None, dist_info.rank):
                    faults.pause_for_signal(job.out_dir, stop)
                due_time = bool(job.train.checkpoint_every_minutes
                                and time.monotonic() - last_ckpt_time > 60 * job.train.checkpoint_every_minutes)
                stop_votes, time_votes, bad_count = distributed.all_reduce_sum(
                    [float(stop.signal is not None), float(due_time), float(len(bad_images))])
                BadImages("train", len(job.dataset), job.data.max_bad_fraction, bad_images).check(int(bad_count))
                batch_images = per_rank * world
                images_seen += batch_images
                log_images += batch_images
                if step % job.train.log_every == 0 or step == last_step:
                    last_loss, logs = _read_mean_over_ranks(values, world)
                    progress.update(step, last_loss, lr)
                    now = time.monotonic()
                    rate = log_images / max(now - log_time, 1e-9)
                    cpu_now = time.process_time()  # this process's CPU time: a rate that machine load does not skew
                    metrics.write({"stage": job.stage, "step": step, "epoch": round(step / steps_per_epoch, 4),
                                   "loss": last_loss, "lr": lr, "img_per_s": round(rate, 2),
                                   "cpu_img_per_s": round(log_images / max(cpu_now - log_cpu, 1e-9), 2),
                                   **{k: round(v, 6) for k, v in logs.items()}})
                    progress.log_line(step, last_loss, lr, rate)
                    collapsed = watch.observe(step, logs)  # the same logs on every rank: no extra collective
                    if collapsed is not None and dist_info.is_main:
                        log.warning(collapsed.message(job.stage))
                    elif watch.recovered_now and dist_info.is_main:
                        log.info(watch.found.recovery_message(job.stage))
                    log_time, log_images, log_cpu = now, 0, cpu_now
                else:
                    progress.update(step, None, lr)
                due_steps = job.train.checkpoint_every_steps and step % job.train.checkpoint_every_steps == 0
                if (due_steps or time_votes) and step < last_step:
                    save_checkpoint()
                    last_ckpt_time = time.monotonic()
                if kill_at and step == kill_at:
                    os._exit(137)
                if stop_votes:
                    save_checkpoint()
                    received = f"signal {stop.signal}" if stop.signal is not None else "a signal on another rank"
                    raise Preempted(f"received {received}; checkpoint written at step {step}",
                                    hint="resubmit the same command with --resume")
                if step >= last_step:
                    break
    metrics.close()
    end_time = time.monotonic()
    wall = end_time - start_time
    save_checkpoint()
    merged: dict[str, str] = {}
    for part in distributed.all_gather_object(bad_images):
        merged.update(part)
    return TrainResult(steps=step, epochs=job.train.epochs, images_seen=images_seen,
                       images_per_sec=images_seen / max(wall, 1e-9), wall_s=wall, final_loss=last_loss,
                       resumed_from_step=resumed_from, total_wall_s=total_wall(end_time), world_size=world,
                       grad_accum=job.train.grad_accum,
                       sync_bn=bool(job.train.sync_bn and world > 1),
                       bad_images=[f"{path}: {why}" for path, why in sorted(merged.items())],
                       threads=threads.to_dict(),
                       collapse=None if watch.found is None else watch.found.to_dict())


def _restore(state: dict, student: nn.Module, method: Method, optimizer, scaler, dist_info,
             teacher: Teacher | None = None) -> None:
    """Load a checkpoint into the live objects; a wrong architecture is one line, not a key dump.
    ``teacher``: the co-trained teacher, restored with the student."""
    try:
        student.load_state_dict(state["student"])
        method.load_state_dict(state["method"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise InputError(f"the checkpoint does not fit this student/method: {first}",
                         hint="use --restart to discard it, or rerun with the original recipe") from None
    scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    if isinstance(rngs, dict):  # written by a single-process run of an older version
        rngs = [rngs]
    # Same world size: every rank continues its own RNG stream (exact). Otherwise rank 0's stream is reused.
    restore_rng(rngs[dist_info.rank] if len(rngs) == dist_info.world_size else rngs[0])


def _pause_hook() -> tuple[int, int | None]:
    """DISTILLCTL_TEST_PAUSE_AT_STEP = "N" (every rank) or "N:R" (rank R only); test hook."""
    value = os.environ.get(faults.PAUSE_AT_STEP_ENV, "")
    if not value:
        return 0, None
    step, _, rank = value.partition(":")
    return int(step), int(rank) if rank else None


def _check_teacher_mode(name: str, requirements: Requirements, job: TrainJob) -> bool:
    """True for a co-trained teacher. A feature cache cannot serve a co-trained teacher, nor teacher taps it
    was built without (the pipeline's teacher_plan and cache stage refuse such runs first; this guards direct
    callers)."""
    co_trained = requirements.teacher_mode == "co_trained"
    missing = [tap for tap in requirements.teacher_taps if tap not in getattr(job.cache, "taps", {})]
    if job.cache is not None and (co_trained or missing):
        what = "a co-trained teacher" if co_trained else f"teacher taps {', '.join(missing)}"
        raise InputError(f"method {name} needs {what}, which "
                         + ("a feature cache cannot provide" if co_trained else "its feature cache does not hold"),
                         hint="use --teacher-mode online" + ("" if co_trained else ", or rebuild the cache"))
    if co_trained and job.teacher is None:
        raise InputError(f"method {name} co-trains its teacher; the run has no teacher model")
    return co_trained


def _read_mean_over_ranks(values: StepValues, world: int) -> tuple[float, dict[str, float]]:
    """The step's loss and logs on the host, averaged over ranks (every rank calls this at the same steps)."""
    loss, logs = values.read()
    keys = sorted(logs)
    loss_sum, *log_sums = distributed.all_reduce_sum([loss, *(logs[key] for key in keys)])
    return loss_sum / world, {key: value / world for key, value in zip(keys, log_sums)}


def _accumulate(job: TrainJob, batch, requirements, teacher_slots, student_slots, forward_student,
                student_taps: TapRecorder, scaler, device, step: int, steps_per_epoch: int, values: StepValues,
                co_trained: bool = False) -> MethodInputs:
    """Forward/backward over the micro-batches of this rank's batch; hands the micro-batch losses and logs to
    ``values`` (still on the device) and returns the inputs of the whole batch for ``after_step``. Gradients are
    summed in ``.grad``, each micro-batch weighted 1/k."""
    views_uint8, _labels, index, stored, sources = batch
    neighbour_slots = _neighbour_slots(requirements)
    chunks = torch.arange(index.shape[0]).tensor_split(job.train.grad_accum)
    losses, all_logs, all_inputs = [], [], []
    for rows in chunks:
        images = [_to_device(normalize(v[rows].to(device, non_blocking=True), job.mean, job.std), job.train.channels_last)
                  for v in views_uint8]
        targets = teacher_outputs(job.teacher, job.cache, requirements, images, teacher_slots, sources[rows],
                                  stored[rows], device, job.train.amp, co_trained)
        with autocast(device, job.train.amp):
            features, taps = student_forward(forward_student, student_taps, requirements, images, student_slots)
            inputs = MethodInputs(student_features=features, teacher_outputs=targets, images=images,
                                  index=index[rows].to(device), epoch=step / steps_per_epoch, step=step,
                                  total_epochs=job.train.epochs, student=job.student,
                                  extras={"neighbour_index": sources[rows, neighbour_slots[0]].to(device)}
                                  if neighbour_slots else {},
                                  student_taps=taps, teacher=job.teacher if co_trained else None,
                                  steps_per_epoch=steps_per_epoch)
            loss, logs = job.method.loss(inputs)
        values.observe(loss, step)  # checked at the next read (log step, checkpoint), not here: no host sync
        scaler.scale(loss / job.train.grad_accum if job.train.grad_accum > 1 else loss).backward()
        losses.append(loss.detach())
        all_logs.append(logs)
        all_inputs.append(inputs)
    values.set_step(losses, all_logs)
    return all_inputs[0] if len(all_inputs) == 1 else merge_inputs(all_inputs)


def _to_device(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _neighbour_slots(requirements) -> list[int]:
    return [i for i, view in enumerate(requirements.views) if getattr(view, "source", "self") == "neighbour"]


def _average_gradients(parameters: list[nn.Parameter]) -> None:
    """All-reduce gradients (mean) across ranks: one explicit sync instead of a DDP wrapper, so the
    student, the method's heads and anything else trainable stay plain modules (and the frozen
    teacher is never wrapped). Every rank runs the same graph on equally sized batches (unreadable
    images are substituted, see ViewDataset), so the set of parameters with gradients agrees."""
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
