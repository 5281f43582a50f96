"""In-process training jobs without BatchNorm anywhere (tiny conv student, SimReg head with its BN layers
replaced by identities), small enough to run several times per test."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distillctl.config import DataConfig, TrainConfig
from distillctl.data.datasets import open_dataset
from distillctl.methods.base import TeacherDims, build_method
from distillctl.teachers.base import Teacher
from distillctl.train.loop import TrainJob


def _net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def strip_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            strip_batchnorm(child)
    return module


def tiny_job(out: Path, *, images: int = 128, batch: int = 32, grad_accum: int = 1, seed: int = 0, **overrides) -> TrainJob:
    """A 4-step (default) SimReg job on digits at 16 px; same seed → same initial weights."""
    torch.manual_seed(seed)
    student = _net(8)
    teacher = Teacher(name="tiny", arch="tiny", backbone=_net(6).eval(), embed_dim=6, sha256="0" * 64)
    method = strip_batchnorm(build_method("simreg", {}, 8, TeacherDims(6, None)))
    data = open_dataset("builtin:digits").subset(range(images))
    settings = dict(epochs=1, batch_size=batch, lr=0.05, grad_accum=grad_accum, checkpoint_every_minutes=None,
                    log_every=1)
    settings.update({key: value for key, value in overrides.items() if key in TrainConfig.model_fields})
    fields = {key: value for key, value in overrides.items() if key not in TrainConfig.model_fields}
    out.mkdir(parents=True, exist_ok=True)
    return TrainJob(method=method, student=student, dataset=data, train=TrainConfig(**settings),
                    data=DataConfig(image_size=16), out_dir=out, metrics_path=out / "metrics.jsonl",
                    fingerprint="test", teacher=teacher, **fields)
