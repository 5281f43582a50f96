"""The loaded-teacher contract every teacher source (registry entry, local file, timm tag,
``pretrain:``) resolves to. The trainer, the cache and evaluation only see this type."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Preprocess:
    """How the teacher's authors fed it images."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_size: int = 224
    resize: int | None = 256
    interpolation: str = "bilinear"


@dataclass
class Teacher:
    """A frozen teacher: ``backbone(x)`` gives the pooled embedding; ``projection`` (optional)
    maps that embedding to the SSL head's output, kept apart so methods can choose."""

    name: str
    arch: str
    backbone: nn.Module
    embed_dim: int
    sha256: str
    projection: nn.Module | None = None
    proj_dim: int | None = None
    license: str = "unknown"
    preprocess: Preprocess = field(default_factory=Preprocess)
    source: str = "local"
    reference_top1: float | None = None
    resolution: dict | None = None  # set when a ViT's position embeddings were resampled (distillctl.resolution)

    def freeze(self) -> "Teacher":
        for module in (self.backbone, self.projection):
            if module is not None:
                module.requires_grad_(False)
        return self

    def to(self, device: torch.device | str) -> "Teacher":
        self.backbone.to(device)
        if self.projection is not None:
            self.projection.to(device)
        return self

    def set_bn_mode(self, mode: str) -> None:
        """Eval (default) or train-mode BatchNorm for the frozen teacher (recorded in the run)."""
        for module in (self.backbone, self.projection):
            if module is not None:
                module.train(mode == "train")

    @torch.no_grad()
    def forward(self, images: torch.Tensor, outputs: frozenset[str] | set[str]) -> dict[str, torch.Tensor]:
        """Compute the requested outputs: ``pooled`` and/or ``proj``."""
        pooled = self.backbone(images)
        result: dict[str, torch.Tensor] = {}
        if "pooled" in outputs:
            result["pooled"] = pooled
        if "proj" in outputs:
            if self.projection is None:
                from distillctl.errors import UsageError

                raise UsageError(f"teacher '{self.name}' has no projection head; use teacher_feature: backbone")
            result["proj"] = self.projection(pooled)
        return result

    def describe(self) -> dict:
        described = {
            "name": self.name,
            "arch": self.arch,
            "sha256": self.sha256,
            "license": self.license,
            "embed_dim": self.embed_dim,
            "proj_dim": self.proj_dim,
            "source": self.source,
        }
        if self.resolution is not None:
            described["resolution"] = self.resolution
        return described
