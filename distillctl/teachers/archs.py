"""Build teacher architectures (torchvision / timm / distillctl wide ResNet) and projection heads.

A backbone is first built *with* its classifier so a converted state dict can be checked against
the exact missing/unexpected key sets the authors' own ``main_lincls.py`` scripts assert, then the
classifier is replaced so ``backbone(x)`` returns the pooled embedding. Heads are described by a
small layout string, e.g. ``Linear(2048,4096,nobias)-BN(4096)-ReLU-Linear(4096,256,nobias)-BN(256,noaffine)``,
whose module indices reproduce the ``nn.Sequential`` key names used in the released files.
"""

from __future__ import annotations

import ast
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from distillctl.errors import InputError, UsageError, unknown_name

if TYPE_CHECKING:  # the network builders import torch when called; the registry (ArchSpec, parse_arch) never does
    import torch
    from torch import nn

BUILDERS = ("torchvision", "timm", "distillctl")


class ArchSpec(BaseModel):
    """Which library builds the network, its name, and constructor keyword arguments."""

    model_config = ConfigDict(extra="forbid")

    builder: str = Field(pattern="^(torchvision|timm|distillctl)$")
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.kwargs.items()))
        return f"{self.builder}:{self.name}" + (f"({extra})" if extra else "")


def parse_arch(text: str) -> ArchSpec:
    """``resnet18`` (timm) | ``torchvision:resnet50`` | ``distillctl:wide_resnet(widen=2)`` |
    ``timm:vit_small_patch16_224(num_heads=12)``."""
    match = re.fullmatch(r"\s*(?:(\w+):)?([\w.\-]+)\s*(?:\((.*)\))?\s*", text)
    if not match:
        raise UsageError(f"cannot parse teacher architecture '{text}'", hint="e.g. resnet50, torchvision:resnet50, timm:vit_small_patch16_224(num_heads=12)")
    builder, name, args = match.group(1) or "timm", match.group(2), match.group(3)
    if builder not in BUILDERS:
        raise unknown_name("architecture builder", builder, list(BUILDERS))
    kwargs: dict[str, Any] = {}
    if args:
        try:
            call = ast.parse(f"f({args})", mode="eval").body
            assert isinstance(call, ast.Call) and not call.args
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
        except (SyntaxError, ValueError, AssertionError):
            raise UsageError(f"bad keyword arguments in architecture '{text}'", hint="use literal values: name(k=1, flag=True)") from None
    return ArchSpec(builder=builder, name=name, kwargs=kwargs)


def build_classifier_model(spec: ArchSpec) -> nn.Module:
    """The architecture as its authors would build it for linear evaluation (classifier included)."""
    if spec.builder == "torchvision":
        import torchvision

        factory = getattr(torchvision.models, spec.name, None)
        if factory is None or not callable(factory):
            raise unknown_name("torchvision architecture", spec.name, ["resnet18", "resnet50", "resnet101", "resnet152"])
        return factory(weights=None, **spec.kwargs)
    if spec.builder == "timm":
        import timm

        if spec.name.split(".")[0] not in timm.list_models():  # a ".tag" suffix picks the pretrained cfg
            raise unknown_name("timm architecture", spec.name, timm.list_models(spec.name.split("_")[0] + "*")[:20] or ["<a timm model name>"])
        return timm.create_model(spec.name, pretrained=False, **spec.kwargs)
    from distillctl.teachers.wide_resnet import wide_resnet

    if spec.name not in ("wide_resnet", "resnet50w2", "resnet50w4", "resnet50w5"):
        raise unknown_name("distillctl architecture", spec.name, ["wide_resnet", "resnet50w2", "resnet50w4", "resnet50w5"])
    kwargs = dict(spec.kwargs)
    if spec.name != "wide_resnet":
        kwargs.setdefault("widen", int(spec.name[-1]))
    return wide_resnet(**kwargs)


def classifier_prefix(spec: ArchSpec, model: nn.Module) -> str:
    """Key prefix of the classification layer the teacher drops (``fc.`` or ``head.``)."""
    if spec.builder == "timm":
        return getattr(model, "pretrained_cfg", {}).get("classifier", "head") + "."
    return "fc."


def strip_classifier(spec: ArchSpec, model: nn.Module) -> nn.Module:
    """Replace the classifier so ``model(x)`` returns the pooled embedding; sets ``num_features``."""
    from torch import nn

    if spec.builder == "timm":
        model.reset_classifier(0)
        return model
    features = model.fc.in_features if isinstance(model.fc, nn.Linear) else getattr(model, "num_features")
    model.fc = nn.Identity()
    model.num_features = int(features)
    return model


def build_backbone(spec: ArchSpec) -> nn.Module:
    """The headless teacher backbone."""
    return strip_classifier(spec, build_classifier_model(spec))


# --- projection heads -------------------------------------------------------------------------

_LAYER = re.compile(r"(Linear|BN|ReLU|GELU)(?:\(([^)]*)\))?")


def build_head(layout: str) -> nn.Sequential:
    """Build an ``nn.Sequential`` from a layout string (see module docstring)."""
    from torch import nn

    layers: list[nn.Module] = []
    for token in layout.split("-"):
        match = _LAYER.fullmatch(token.strip())
        if not match:
            raise InputError(f"bad head layout token '{token}' in '{layout}'")
        kind, args = match.group(1), [a.strip() for a in (match.group(2) or "").split(",") if a.strip()]
        if kind == "Linear":
            layers.append(nn.Linear(int(args[0]), int(args[1]), bias="nobias" not in args))
        elif kind == "BN":
            layers.append(nn.BatchNorm1d(int(args[0]), affine="noaffine" not in args))
        elif kind == "ReLU":
            layers.append(nn.ReLU(inplace=False))
        else:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def infer_head_layout(state: dict[str, torch.Tensor]) -> str:
    """Read a Sequential head's layout back from its state dict (parameter-free slots are ReLU)."""
    indices = sorted({int(key.split(".")[0]) for key in state if key.split(".")[0].isdigit()})
    if not indices or len(indices) != len({key.split(".")[0] for key in state}):
        raise InputError(f"cannot infer a projection-head layout from keys {sorted(state)[:6]}")
    tokens = []
    for index in range(indices[-1] + 1):
        weight, bias = state.get(f"{index}.weight"), state.get(f"{index}.bias")
        if f"{index}.running_mean" in state:
            size = state[f"{index}.running_mean"].shape[0]
            tokens.append(f"BN({size})" if weight is not None else f"BN({size},noaffine)")
        elif weight is not None and weight.dim() == 2:
            tokens.append(f"Linear({weight.shape[1]},{weight.shape[0]}" + ("" if bias is not None else ",nobias") + ")")
        elif weight is None and bias is None:
            tokens.append("ReLU")
        else:
            raise InputError(f"cannot infer a projection-head layer from key '{index}.weight' of shape {tuple(weight.shape)}")
    return "-".join(tokens)


def head_output_dim(layout: str) -> int:
    """Output width of a head layout (its last Linear)."""
    linears = re.findall(r"Linear\(\s*\d+\s*,\s*(\d+)", layout)
    if not linears:
        raise InputError(f"head layout '{layout}' has no Linear layer")
    return int(linears[-1])
