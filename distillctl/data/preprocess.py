"""Preprocessing that follows the teacher: input size, crop_pct and normalisation default to how the teacher's
authors fed it images (its registry entry, the ``<stem>.json`` sidecar of a local file, the timm pretrained cfg,
or the run that pretrained it). What the run uses is printed at start and recorded in ``recipe.yaml``
(``data.*`` and the ``derived`` section); a run setting that contradicts the teacher is kept, with a warning
that names both values. A teacher that states nothing (a bare checkpoint without sidecar) leaves the recipe's
defaults (224 px, crop_pct 0.875, ImageNet mean/std) and says so.

The input size is also checked against the student: a network that downsamples 32× turns a 32-px input into
one final pixel (a warning) and an 8-px input into a quarter of one (refused, exit 2).

Pure functions; the pipeline applies the result (:func:`follow_teacher`, :func:`check_image_size`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from distillctl.errors import UsageError

FIELDS = ("image_size", "crop_pct", "mean", "std")
IMAGENET = {"image_size": 224, "crop_pct": 0.875, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@dataclass(frozen=True)
class TeacherPreprocessing:
    """The teacher's own preprocessing (``known`` False: the teacher states none; ImageNet defaults assumed)."""

    image_size: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    origin: str
    known: bool = True

    def value(self, name: str) -> Any:
        value = getattr(self, name)
        return [float(v) for v in value] if isinstance(value, tuple) else value


def from_teacher(preprocess, teacher_name: str) -> TeacherPreprocessing:
    """Read a :class:`~distillctl.teachers.base.Preprocess`: crop_pct is stated, or input size / resize."""
    crop = getattr(preprocess, "crop_pct", None)
    if crop is None:
        crop = preprocess.input_size / preprocess.resize if preprocess.resize else 1.0
    origin = getattr(preprocess, "origin", "") or ""
    known = bool(origin) and not origin.startswith("not stated")
    return TeacherPreprocessing(int(preprocess.input_size), round(float(crop), 4), tuple(preprocess.mean),
                                tuple(preprocess.std), f"{origin or 'not stated'}, teacher {teacher_name}", known)


def _same(a: Any, b: Any, tolerance: float = 1e-3) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(abs(float(x) - float(y)) <= tolerance for x, y in zip(a, b))
    return abs(float(a) - float(b)) <= tolerance


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{float(v):g}" for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Choice:
    """One preprocessing value of the run: recipe key, value, where it comes from."""

    key: str
    value: Any
    teacher: Any
    reason: str

    def as_record(self) -> dict[str, Any]:
        return {"value": self.value, "teacher": self.teacher, "reason": self.reason}


def follow_teacher(current: dict[str, Any], explicit: set[str] | frozenset[str],
                   teacher: TeacherPreprocessing | None) -> tuple[list[Choice], list[str]]:
    """``(choices, warnings)`` for image_size, crop_pct, mean, std.

    ``current`` holds the recipe's data values, ``explicit`` the data fields the user set. Without a teacher
    the recipe's values stand (recorded only for mean/std, whose None means ImageNet's)."""
    choices: list[Choice] = []
    warnings: list[str] = []
    for name in FIELDS:
        key = f"data.{name}"
        value = current.get(name)
        if teacher is None:
            if value is None:
                choices.append(Choice(key, IMAGENET[name], None, "no teacher: ImageNet's normalisation"))
            continue
        theirs = teacher.value(name)
        if name in explicit and value is not None:
            if teacher.known and not _same(value, theirs):
                warnings.append(f"{key}={_show(value)} contradicts the teacher's preprocessing: {name} "
                                f"{_show(theirs)} ({teacher.origin}); the run uses {_show(value)}")
            continue
        if teacher.known:
            choices.append(Choice(key, theirs, theirs, f"the teacher's: {teacher.origin}"))
        elif value is None:
            choices.append(Choice(key, theirs, theirs, f"{teacher.origin}: ImageNet's normalisation assumed"))
        else:
            choices.append(Choice(key, value, None, f"{teacher.origin}: the recipe default {_show(value)}"))
    return choices, warnings


def describe(choices: list[Choice], values: dict[str, Any]) -> str:
    """One line: what the run feeds the networks, and where each value comes from when it was not set."""
    parts = [f"{values['image_size']} px", f"crop_pct {_show(float(values['crop_pct']))}",
             f"mean {_show(values['mean'])}", f"std {_show(values['std'])}"]
    origins = sorted({c.reason for c in choices})
    return "preprocessing: " + ", ".join(parts) + (f" ({'; '.join(origins)})" if origins else " (as set by the run)")


# --- input size vs the student's downsampling -------------------------------------------------------

@functools.lru_cache(maxsize=None)
def student_stride(arch: str) -> int | None:
    """Total downsampling of a student: a timm model's last feature stage's reduction, or a ViT's patch size;
    a torchvision student's from :func:`distillctl.students.torchvision_stride`."""
    import timm

    if arch.startswith("tv:"):
        from distillctl.students import torchvision_stride

        return torchvision_stride(arch)
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        return int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else None
        reduction = last.get("reduction") if isinstance(last, dict) else None
        if reduction:
            return int(reduction)
    return None


def check_image_size(image_size: int, arch: str, stride: int | None) -> str | None:
    """None, or a warning; raises UsageError (exit 2) for a size at most a quarter of the student's stride, or
    below the smallest input a student's pooling layers accept (SqueezeNet)."""
    from distillctl.students import min_input_size

    smallest = min_input_size(arch)
    if smallest and image_size < smallest:
        raise UsageError(f"data.image_size={image_size} is too small for the student {arch}: its ceil-mode max-pools "
                         f"need inputs of at least {smallest} px", hint=f"use --image-size {smallest} or more")
    if not stride:
        return None
    if image_size * 4 <= stride:
        raise UsageError(f"data.image_size={image_size} is too small for the student {arch}, which downsamples "
                         f"{stride}×: its last feature maps would be {image_size}/{stride} of a pixel, so its last "
                         "downsampling stages see one padded pixel",
                         hint=f"use --image-size {2 * stride} or more (a {2 * stride}-px input keeps a 2×2 final map)")
    if image_size <= stride:
        return (f"data.image_size={image_size} is small for the student {arch}, which downsamples {stride}×: its final "
                f"feature map is {max(1, image_size // stride)}×{max(1, image_size // stride)} px, so global pooling "
                f"sees one position; {2 * stride} px or more keeps spatial detail")
    return None
