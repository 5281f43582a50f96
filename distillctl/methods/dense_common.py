"""Feature maps for the dense methods (``dense-reg``, PCD): what a stage tap holds, as a B×C×h×w map.

A ``stage:<i>`` tap (:mod:`distillctl.taps`) is a CNN stage's B×C×h×w output or a ViT block's B×N×D tokens;
:func:`as_map` turns both into maps (a ViT's prefix tokens, CLS and registers, dropped; patches laid on their
square grid). :func:`map_geometry` reads a network's channels and prefix-token count for the tap without a
forward, so the methods can build their 1×1 heads before training starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from distillctl.errors import InputError


@dataclass(frozen=True)
class MapGeometry:
    """Channels of a stage tap's map and the tokens to drop before the patch grid (0 for CNNs)."""

    channels: int
    prefix_tokens: int | None = 0  # None: infer from the token count (largest square grid)


def map_geometry(model: nn.Module, tap: str) -> MapGeometry:
    """Channels and prefix tokens of ``stage:<i>`` on a timm model (``feature_info`` holds the channels)."""
    kind, _, arg = tap.partition(":")
    info = getattr(model, "feature_info", None)
    if kind != "stage" or not info:
        raise InputError(f"dense tap '{tap}': expected stage:<i> on a timm model with feature_info")
    try:
        entry = info[int(arg)]
    except (ValueError, IndexError):
        raise InputError(f"dense tap '{tap}': no such stage ({len(info)} stages)") from None
    prefix = int(getattr(model, "num_prefix_tokens", 0)) if hasattr(model, "blocks") else 0
    return MapGeometry(int(entry["num_chs"]), prefix)


def teacher_map_geometry(method: str, teacher_dims, tap: str) -> MapGeometry:
    """The teacher tap's geometry from the teacher network (``TeacherDims.backbone``); without the network
    (``methods show``, unit tests) its pooled width, prefix tokens inferred from the token count."""
    from distillctl.errors import UsageError

    if teacher_dims is None:
        raise UsageError(f"{method} needs a teacher (its feature maps)", hint="pass --teacher NAME")
    backbone = getattr(teacher_dims, "backbone", None)
    if backbone is None:
        return MapGeometry(int(teacher_dims.pooled), None)
    return map_geometry(backbone, tap)


def as_map(value: torch.Tensor, prefix_tokens: int | None = 0) -> torch.Tensor:
    """A stage tap as B×C×h×w: CNN maps unchanged, ViT tokens B×N×D without their prefix on a square grid."""
    if value.ndim == 4:
        return value
    if value.ndim != 3:
        raise InputError(f"a dense tap must be B×C×h×w or B×N×D, got shape {tuple(value.shape)}")
    if prefix_tokens is None:
        prefix_tokens = value.shape[1] - math.isqrt(value.shape[1]) ** 2
    patches = value[:, prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise InputError(f"{patches.shape[1]} patch tokens do not form a square grid")
    return patches.transpose(1, 2).reshape(value.shape[0], value.shape[2], side, side)
