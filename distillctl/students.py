"""Student factory: friendly aliases for timm architectures, feature dims, and run-dir loading.

A student is always a timm model created with ``num_classes=0`` so its forward returns the pooled
embedding; that is the deployable contract (``student/model.safetensors`` + ``student/config.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distillctl.errors import InputError, unknown_name

# Friendly names users type -> timm model names. Any timm name is accepted as well.
STUDENT_ALIASES: dict[str, str] = {
    "mobilenetv2": "mobilenetv2_100",
    "mobilenetv2-050": "mobilenetv2_050",
    "mobilenetv3": "mobilenetv3_large_100",
    "mobilenetv3-small": "mobilenetv3_small_100",
    "efficientnet-b0": "efficientnet_b0",
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "vit-tiny": "vit_tiny_patch16_224",
    "vit-small": "vit_small_patch16_224",
    "tiny-cnn": "test_resnet",  # timm's own tiny test network; for CPU smoke runs
}


def resolve_arch(name: str) -> str:
    """Map an alias or timm name to a timm model name; unknown names exit 2 with suggestions."""
    import timm

    name = name.strip()
    if name.startswith("timm:"):
        name = name[len("timm:") :]
    arch = STUDENT_ALIASES.get(name, name)
    if arch not in timm.list_models() and arch not in timm.list_models(pretrained=True):
        raise unknown_name("student architecture", name, list(STUDENT_ALIASES) + ["<any timm model name>"])
    return arch


def create_backbone(arch: str, img_size: int | None = None, exportable: bool = False,
                    model_kwargs: dict | None = None) -> nn.Module:
    """A timm model that returns its pooled embedding (``num_classes=0``).

    ``model_kwargs`` are extra constructor keywords (recorded in ``config.json``); without them a fixed-size
    model (ViT) is built for ``img_size`` (see :mod:`distillctl.resolution`).
    """
    import timm

    from distillctl.resolution import student_model_kwargs

    arch = resolve_arch(arch)
    kwargs: dict = {"num_classes": 0, "pretrained": False}
    if exportable:
        kwargs["exportable"] = True
    if model_kwargs is None:
        model_kwargs = student_model_kwargs(arch, img_size) if img_size is not None else {}
    try:
        return timm.create_model(arch, **kwargs, **model_kwargs)
    except TypeError as exc:  # an unknown constructor keyword in student.kwargs
        raise InputError(f"student {arch} does not accept {model_kwargs}: {exc}",
                         hint="student.kwargs are passed to timm.create_model; check the model's signature") from None


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled embedding."""
    dim = getattr(model, "num_features", None)
    if not isinstance(dim, int):
        raise InputError(f"model {type(model).__name__} does not report num_features")
    return dim


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class StudentConfig:
    """The contents of ``student/config.json``."""

    arch: str
    num_features: int
    input_size: list[int]
    mean: list[float]
    std: list[float]
    teacher: dict
    method: str
    license: str | None = None
    # constructor keywords beyond num_classes=0, e.g. {"img_size": 64} for a ViT trained at 64 px:
    # timm.create_model(arch, num_classes=0, **model_kwargs) + load_state_dict reproduces the embedding
    model_kwargs: dict | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def load_student(run_or_student_dir: str | Path, exportable: bool = False) -> tuple[nn.Module, StudentConfig]:
    """Load the deployable student of a run (``<run>/student``) in eval mode, strictly."""
    from safetensors.torch import load_file

    path = Path(run_or_student_dir)
    student_dir = path / "student" if (path / "student").is_dir() else path
    config_path, weights_path = student_dir / "config.json", student_dir / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise InputError(f"no student checkpoint in {path} (expected student/config.json and student/model.safetensors)")
    try:
        config = StudentConfig(**json.loads(config_path.read_text()))
    except (ValueError, TypeError) as exc:
        raise InputError(f"unreadable student config {config_path}: {exc}") from None
    model_kwargs = dict(config.model_kwargs) if config.model_kwargs is not None else None
    if exportable and model_kwargs:  # same weights; a static grid keeps the pos-embed resample out of the graph
        model_kwargs.pop("dynamic_img_size", None)
    model = create_backbone(config.arch, img_size=config.input_size[-1], exportable=exportable, model_kwargs=model_kwargs)
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types
        raise InputError(f"unreadable student weights {weights_path}: {exc}") from None
    load_state_dict_strict(model, state, what=str(weights_path))
    return model.eval(), config


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line report of missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        raise InputError(f"checkpoint {what} does not match the architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
