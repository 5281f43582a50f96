"""Helpers for the feature-cache tests: a tiny deterministic teacher, a spread-out linear teacher, an ImageFolder writer.

A module with a unique name (not ``conftest``) so that test files and the subprocess scripts can import it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from distillctl.teachers.base import Teacher

TEACHER_SHA = "ab" * 32
MEAN = (0.5, 0.45, 0.4)
STD = (0.25, 0.24, 0.23)


def build_test_cache(teacher: Teacher, dataset, out: Path, **options):
    """``build_cache`` with the tests' normalisation, 16-image shards and no progress bar; ``options`` override."""
    from distillctl.cache.build import build_cache

    return build_cache(teacher, dataset, out, **{"mean": MEAN, "std": STD, "shard_size": 16, "progress": False,
                                                 **options})


def make_teacher(seed: int = 0, sha256: str = TEACHER_SHA) -> Teacher:
    """timm ``test_resnet`` (96-d pooled) + a linear 16-d projection, initialised from ``seed``."""
    torch.manual_seed(seed)
    backbone = timm.create_model("test_resnet", num_classes=0)
    projection = nn.Linear(backbone.num_features, 16)
    return Teacher(name="t", arch="test_resnet", backbone=backbone, embed_dim=backbone.num_features, sha256=sha256,
                   projection=projection, proj_dim=16).freeze()


class LinearBackbone(nn.Module):
    """A 'teacher' with well-spread (roughly Gaussian) embeddings, for neighbour and cluster tests."""

    def __init__(self, size: int, dim: int = 24, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(3 * size * size, dim, generator=generator) / (3 * size * size) ** 0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ self.weight


def write_image_folder(root: Path, per_class: int = 10, classes: int = 4, seed: int = 0) -> Path:
    """``classes`` x ``per_class`` PNGs of varying sizes (20..47 px per side) with some structure."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = (int(v) for v in rng.integers(20, 48, size=2))
            yy, xx = np.mgrid[0:height, 0:width]
            base = np.stack([(xx * (label + 1) * 7) % 256, (yy * 11 + i * 13) % 256, ((xx + yy) * 5) % 256], axis=-1)
            noise = rng.integers(0, 40, size=(height, width, 3))
            Image.fromarray(((base + noise) % 256).astype(np.uint8)).save(folder / f"img{i:02d}.png")
    return root
