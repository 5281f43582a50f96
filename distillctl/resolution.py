"""Input resolution of patch-based models (ViT, DeiT, EVA, …): adapt them to the run's image size, or refuse.

A ViT bakes its input grid into its learned position embeddings: a ``vit_tiny_patch16_224`` holds 14×14 of
them and timm asserts ``Input height (64) doesn't match model (224)`` on any other size. distillctl adapts
instead of failing, and says so:

- **Students** are created at the run's size (``timm.create_model(arch, img_size=S)``; random init, so the
  embeddings are simply made for the S/p × S/p grid). When a method also feeds the student views of other
  sizes (multi-crop), the student is built with ``dynamic_img_size=True`` and timm resamples the embeddings
  per forward. The constructor keywords are written to ``student/config.json`` as ``model_kwargs``, so
  ``timm.create_model(arch, num_classes=0, **model_kwargs)`` + ``load_state_dict`` reproduces the student.
- **Teachers** keep their trained weights; their position embeddings are resampled once to the run's grid
  with timm's own helper (``set_input_size``: bicubic, antialiased, prefix tokens kept), the same
  single resample timm performs when a checkpoint is loaded at another ``img_size``. The change is printed
  and recorded in the teacher's description (``resolution``), which is part of the run's summary.
- A size that is not a multiple of the patch size is refused up front (exit 2) with the nearest valid sizes;
  so is a fixed-grid model that cannot be resized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from torch import nn

from distillctl.errors import UsageError


@dataclass(frozen=True)
class PatchGrid:
    """What a patch-based model was built for: its input size, patch size and whether any size is accepted."""

    img_size: tuple[int, int] | None
    patch_size: tuple[int, int]
    dynamic: bool

    @property
    def grid(self) -> tuple[int, int] | None:
        if self.img_size is None:
            return None
        return self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def patch_grid(model: nn.Module) -> PatchGrid | None:
    """The model's patch grid, or None for models without a patch embedding (CNNs take any size)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or getattr(embed, "patch_size", None) is None:
        return None
    img_size = getattr(embed, "img_size", None)
    dynamic = bool(getattr(model, "dynamic_img_size", False)) or not getattr(embed, "strict_img_size", True) \
        or img_size is None
    return PatchGrid(_pair(img_size) if img_size is not None else None, _pair(embed.patch_size), dynamic)


def check_patch_multiple(grid: PatchGrid | None, sizes: Iterable[int], what: str) -> None:
    """Exit 2 when an input size is not a multiple of the patch size (timm would drop the border silently)."""
    if grid is None:
        return
    patch = grid.patch_size[0]
    for size in sorted(set(int(s) for s in sizes)):
        if size % patch:
            lower, upper = max(patch, size - size % patch), size - size % patch + patch
            raise UsageError(f"{what} has {patch}-pixel patches; input size {size} is not a multiple of {patch}",
                             hint=f"use --image-size {lower} or {upper}, or a model with another patch size")


def fixed_input_size(arch: str) -> bool:
    """True when timm builds ``arch`` for one input size (its pretrained cfg says ``fixed_input_size``)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError:
        cfg = None
    return bool(cfg is not None and getattr(cfg, "fixed_input_size", False))


def student_model_kwargs(arch: str, image_size: int, view_sizes: Iterable[int] = (),
                         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Constructor keywords (the recipe's ``student.kwargs`` plus what makes a fixed-size timm model take the
    run's views), as recorded in ``config.json``."""
    kwargs: dict[str, Any] = dict(extra or {})
    if not fixed_input_size(arch):
        return kwargs
    kwargs["img_size"] = int(image_size)
    if any(int(size) != int(image_size) for size in view_sizes):
        kwargs["dynamic_img_size"] = True
    return kwargs


def check_student(model: nn.Module, arch: str, sizes: Iterable[int]) -> None:
    """Refuse (exit 2) sizes the student's patch grid cannot take."""
    check_patch_multiple(patch_grid(model), sizes, f"student {arch}")


def adapt_to_size(model: nn.Module, size: int, what: str) -> dict[str, Any] | None:
    """Resample a fixed-grid model's position embeddings for ``size`` px inputs, in place.

    Returns a record of the change (None when nothing had to change); exit 2 when it cannot be done.
    """
    grid = patch_grid(model)
    if grid is None:
        return None
    check_patch_multiple(grid, [size], what)
    if grid.dynamic or grid.img_size == (size, size):
        return None
    if not callable(getattr(model, "set_input_size", None)):
        raise UsageError(f"{what} is built for {grid.img_size[0]} px inputs and cannot be resized to {size} px",
                         hint=f"use --image-size {grid.img_size[0]}")
    old = grid.grid
    try:
        model.set_input_size(img_size=(size, size))
    except (AssertionError, ValueError, RuntimeError, TypeError) as exc:
        raise UsageError(f"{what} cannot be resized from {grid.img_size[0]} to {size} px: {exc}",
                         hint=f"use --image-size {grid.img_size[0]}") from None
    new = patch_grid(model).grid
    return {"trained_size": grid.img_size[0], "input_size": size, "patch_size": grid.patch_size[0],
            "grid": f"{old[0]}x{old[1]} -> {new[0]}x{new[1]}",
            "pos_embed": "resampled once (timm set_input_size: bicubic, antialias)"}


def adapt_teacher(teacher, size: int, announce=None) -> None:
    """Adapt every member of a teacher (or ensemble) to ``size`` px; record and announce what changed."""
    members = getattr(teacher, "members", None) or [teacher]
    for member in members:
        record = adapt_to_size(member.backbone, size, f"teacher {member.name} ({member.arch})")
        if record is None:
            continue
        member.resolution = record
        if announce is not None:
            announce(f"teacher {member.name}: position embeddings resampled {record['grid']} for {size} px inputs "
                     f"(trained at {record['trained_size']} px)")


def check_teacher_views(teacher, sizes: Iterable[int]) -> None:
    """A fixed-grid teacher sees one size: refuse a method whose teacher views come in several (exit 2)."""
    sizes = sorted(set(int(s) for s in sizes))
    members = getattr(teacher, "members", None) or [teacher]
    for member in members:
        grid = patch_grid(member.backbone)
        if grid is None:
            continue
        check_patch_multiple(grid, sizes, f"teacher {member.name}")
        if not grid.dynamic and len(sizes) > 1:
            raise UsageError(f"teacher {member.name} is a fixed-grid ViT but the method shows it views of "
                             f"{', '.join(map(str, sizes))} px", hint="use a method whose teacher views share one size")
