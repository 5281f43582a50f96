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
    crop_pct: float | None = None  # centre-crop share of the short side; None: input_size / resize (1.0 without)
    # where these values come from; "not stated…" when the teacher gives none (the run then keeps its defaults)
    origin: str = "not stated (ImageNet defaults assumed)"


@dataclass
class Teacher:
    """A teacher: ``backbone(x)`` gives the pooled embedding; ``projection`` (optional) maps that embedding
    to the SSL head's output, kept apart so methods can choose. Frozen, except for co-trained methods."""

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

    def parts(self) -> dict[str, nn.Module]:
        """The teacher's modules by checkpoint prefix: ``backbone`` and (if any) ``projection``."""
        return {name: module for name, module in (("backbone", self.backbone), ("projection", self.projection))
                if module is not None}

    def freeze(self) -> "Teacher":
        for module in self.parts().values():
            module.requires_grad_(False)
        return self

    def unfreeze(self) -> "Teacher":
        """Make the teacher trainable (``teacher_mode="co_trained"``)."""
        for module in self.parts().values():
            module.requires_grad_(True)
        return self

    def parameters(self) -> list[nn.Parameter]:
        return [p for module in self.parts().values() for p in module.parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights and buffers of every part, keys prefixed ``backbone.`` / ``projection.``."""
        return {f"{name}.{key}": value for name, module in self.parts().items()
                for key, value in module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Strict load of :meth:`state_dict`'s output (a co-trained teacher's checkpoint)."""
        for name, module in self.parts().items():
            prefix = name + "."
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        unknown = [k for k in state if k.split(".", 1)[0] not in self.parts()]
        if unknown:
            raise KeyError(f"unexpected teacher keys, e.g. {unknown[0]}")

    def to(self, device: torch.device | str) -> "Teacher":
        for module in self.parts().values():
            module.to(device)
        return self

    def set_bn_mode(self, mode: str) -> None:
        """Eval (default) or train-mode BatchNorm for the frozen teacher (recorded in the run)."""
        for module in self.parts().values():
            module.train(mode == "train")

    def forward(self, images: torch.Tensor, outputs: frozenset[str] | set[str], taps: tuple[str, ...] = (),
                grad: bool = False) -> dict[str, torch.Tensor]:
        """Compute the requested outputs (``pooled`` and/or ``proj``) and taps (keyed by tap name, see
        :mod:`distillctl.taps`) from one backbone forward; without gradient unless ``grad`` (co-trained)."""
        from distillctl.taps import TapRecorder

        with torch.set_grad_enabled(grad), TapRecorder(self.backbone, taps) as recorder:
            pooled = self.backbone(images)
            result: dict[str, torch.Tensor] = dict(recorder.take()) if taps else {}
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
