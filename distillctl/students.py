"""Student factory: friendly aliases, timm and torchvision architectures, feature dims, and run-dir loading.

A student's forward returns its pooled embedding; that is the deployable contract (``student/model.safetensors``
+ ``student/config.json``, whose ``library`` says which library rebuilds it):

- **timm** (``library: timm``, the default): ``timm.create_model(arch, num_classes=0, **model_kwargs)``.
- **torchvision** (``library: torchvision``; ``arch`` is written ``tv:<name>``, e.g. ``tv:shufflenet_v2_x1_0``):
  ``torchvision.models.get_model(name, weights=None, **model_kwargs)`` with its classifier removed by
  :func:`strip_torchvision_classifier`, so the state-dict keys are torchvision's own minus the classifier's.
  For torchvision models timm does not have (ShuffleNetV2, SqueezeNet: arXiv 2110.11160's lightweight students).

Every student is created by :func:`create_backbone` and every saved one is rebuilt by :func:`build_student`
(through :func:`load_student`), so no other module needs to know which library a student comes from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distillctl.errors import InputError, UsageError, nearest, unknown_name
from distillctl.student_aliases import STUDENT_ALIASES, TORCHVISION_PREFIXES  # re-exported

# torchvision classification models refused as students: auxiliary classifiers in training mode (googlenet,
# inception_v3) or a fixed input grid / another head layout (vit_*, swin_*, maxvit_t)
_TV_UNSUPPORTED = ("googlenet", "inception_v3", "vit_", "swin_", "maxvit")


def student_library(arch: str) -> str:
    """``torchvision`` for a resolved ``tv:<name>`` architecture, else ``timm``."""
    return "torchvision" if arch.startswith("tv:") else "timm"


def torchvision_students() -> list[str]:
    """torchvision classification models usable as students (``tv:<name>``)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return [name for name in names if not name.startswith(_TV_UNSUPPORTED)]


def _resolve_torchvision(name: str, typed: str) -> str:
    choices = torchvision_students()
    if name not in choices:
        close = nearest(f"tv:{name}", [f"tv:{choice}" for choice in choices])
        raise UsageError(f"unknown torchvision student architecture '{typed}'; valid: tv:<one of torchvision's "
                         f"{len(choices)} classification models except {', '.join(p.rstrip('_') for p in _TV_UNSUPPORTED)}>",
                         hint=f"did you mean: {', '.join(close)}?" if close else
                         "e.g. tv:shufflenet_v2_x1_0, tv:squeezenet1_1, tv:resnet18 (torchvision.models.list_models())")
    return f"tv:{name}"


def resolve_arch(name: str) -> str:
    """Map an alias, timm name or ``tv:<torchvision name>`` to the canonical architecture (a timm name or
    ``tv:<name>``); unknown names exit 2 with suggestions."""
    import timm

    name = name.strip()
    if name.startswith("timm:"):
        name = name[len("timm:") :]
    arch = STUDENT_ALIASES.get(name, name)
    for prefix in TORCHVISION_PREFIXES:
        if arch.startswith(prefix):
            return _resolve_torchvision(arch[len(prefix):], name)
    if arch not in timm.list_models() and arch not in timm.list_models(pretrained=True):
        raise unknown_name("student architecture", name, list(STUDENT_ALIASES) + ["<any timm model name>", "tv:<torchvision model name>"])
    return arch


def create_backbone(arch: str, img_size: int | None = None, exportable: bool = False,
                    model_kwargs: dict | None = None) -> nn.Module:
    """A randomly initialised student that returns its pooled embedding (timm: ``num_classes=0``; torchvision:
    classifier removed, see :func:`strip_torchvision_classifier`).

    ``model_kwargs`` are extra constructor keywords (recorded in ``config.json``); without them a fixed-size
    model (ViT) is built for ``img_size`` (see :mod:`distillctl.resolution`). ``exportable`` is timm's flag
    (static padding for ONNX); torchvision models export as they are.
    """
    import timm

    from distillctl.resolution import student_model_kwargs

    arch = resolve_arch(arch)
    if student_library(arch) == "torchvision":
        return _torchvision_backbone(arch, dict(model_kwargs or {}))
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


def _torchvision_backbone(arch: str, model_kwargs: dict) -> nn.Module:
    import torchvision

    name = arch[len("tv:"):]
    try:
        model = torchvision.models.get_model(name, weights=None, **model_kwargs)
    except TypeError as exc:
        raise InputError(f"student {arch} does not accept {model_kwargs}: {exc}",
                         hint="student.kwargs are passed to torchvision.models.get_model; check the model's signature") from None
    return strip_torchvision_classifier(model, arch)


def strip_torchvision_classifier(model: nn.Module, arch: str) -> nn.Module:
    """Make a torchvision classifier return its pooled embedding, in place; sets ``num_features``.

    - ``fc`` a Linear (ResNet, ResNeXt, RegNet, ShuffleNetV2) or ``classifier`` a Linear (DenseNet): replaced by
      Identity; the embedding is the globally pooled last feature map, as torchvision computes it.
    - ``classifier`` a Sequential ending in a Linear (MobileNet, EfficientNet, MNASNet, ConvNeXt, VGG): that last
      Linear and the Dropout layers just before it are removed; the embedding is the final Linear's input.
    - SqueezeNet: its classifier is Dropout → 1x1 conv to the classes → ReLU → global average pool, so no pooled
      embedding exists before it; it becomes a global average pool of ``features`` (the last Fire module's
      512 channels, already ReLU-ed), i.e. the embedding is GAP(features(x)), 512-d.
    """
    from torch import nn as torch_nn

    if arch.startswith("tv:squeezenet"):
        width = model.classifier[1].in_channels
        model.classifier = torch_nn.Sequential(torch_nn.AdaptiveAvgPool2d((1, 1)))  # forward flattens after it
        model.num_features = int(width)
        return model
    for attribute in ("fc", "classifier"):
        head = getattr(model, attribute, None)
        if isinstance(head, torch_nn.Linear):
            setattr(model, attribute, torch_nn.Identity())
            model.num_features = int(head.in_features)
            return model
        if isinstance(head, torch_nn.Sequential) and len(head) and isinstance(head[-1], torch_nn.Linear):
            layers = list(head)
            width = layers.pop().in_features
            while layers and isinstance(layers[-1], torch_nn.Dropout):
                layers.pop()
            setattr(model, attribute, torch_nn.Sequential(*layers) if layers else torch_nn.Identity())
            model.num_features = int(width)
            return model
    raise InputError(f"student {arch}: no classifier distillctl knows how to remove (expected fc or classifier)",
                     hint="use a timm model, or tv:shufflenet_v2_x1_0 / tv:squeezenet1_1 / tv:resnet18")


def torchvision_stride(arch: str) -> int:
    """Total downsampling of a torchvision student (it has no timm ``feature_info``): SqueezeNet's stride-2 stem
    and three stride-2 max-pools give 16; the other supported families end at 32."""
    return 16 if arch.startswith("tv:squeezenet") else 32


def min_input_size(arch: str) -> int | None:
    """The smallest input (px) a student runs on, where a forward would fail below it: SqueezeNet's three
    3x3 stride-2 ceil-mode max-pools leave an empty map under 17 px (1.1) or 21 px (1.0)."""
    return {"tv:squeezenet1_1": 17, "tv:squeezenet1_0": 21}.get(arch)


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
    # which library rebuilds ``arch``: timm, or torchvision (arch ``tv:<name>``); None: taken from arch
    # (configs written before torchvision students have no key and are timm)
    library: str | None = None

    def __post_init__(self) -> None:
        if self.library is None:
            self.library = student_library(self.arch)
        if self.library == "torchvision" and not self.arch.startswith("tv:"):
            self.arch = f"tv:{self.arch}"  # a hand-written config may name the torchvision model bare
        if self.library not in ("timm", "torchvision") or student_library(self.arch) != self.library:
            raise ValueError(f"library {self.library!r} does not build arch {self.arch!r} (timm, or torchvision "
                             "with arch tv:<name>)")

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def build_student(config: StudentConfig, exportable: bool = False) -> nn.Module:
    """The (random-init) network a ``student/config.json`` describes, from its library; the one place a saved
    student is rebuilt (:func:`load_student` then loads its weights)."""
    model_kwargs = dict(config.model_kwargs) if config.model_kwargs is not None else None
    if exportable and model_kwargs:  # same weights; a static grid keeps the pos-embed resample out of the graph
        model_kwargs.pop("dynamic_img_size", None)
    return create_backbone(config.arch, img_size=config.input_size[-1], exportable=exportable, model_kwargs=model_kwargs)


def find_student_dir(run_or_student_dir: str | Path) -> Path | None:
    """The folder holding a deployable student (``config.json`` and ``model.safetensors``): ``<run>/student``, or
    the given folder itself; None when neither holds both files."""
    path = Path(run_or_student_dir)
    for candidate in (path / "student", path):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    return None


def require_student_files(run_or_student_dir: str | Path, hint: str | None = None) -> tuple[Path, Path]:
    """``(config.json, model.safetensors)`` of a run's deployable student; InputError (exit 2) naming what is
    expected when there is none. Reads nothing else, so a caller can refuse a folder that is not a finished run
    before touching it (``export`` does, before its run lock)."""
    student_dir = find_student_dir(run_or_student_dir)
    if student_dir is None:
        raise InputError(f"no student checkpoint in {run_or_student_dir} (expected student/config.json and "
                         "student/model.safetensors)", hint=hint)
    return student_dir / "config.json", student_dir / "model.safetensors"


def load_student(run_or_student_dir: str | Path, exportable: bool = False) -> tuple[nn.Module, StudentConfig]:
    """Load the deployable student of a run (``<run>/student``) in eval mode, strictly."""
    from safetensors.torch import load_file

    config_path, weights_path = require_student_files(run_or_student_dir)
    try:
        config = StudentConfig(**json.loads(config_path.read_text()))
    except (ValueError, TypeError) as exc:
        raise InputError(f"unreadable student config {config_path}: {exc}") from None
    model = build_student(config, exportable=exportable)
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
