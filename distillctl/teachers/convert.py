"""Checkpoint converters, one per family, and the structural check every conversion must pass.

Each converter opens the family's container, keeps the backbone (prefix stripped), keeps the
projection head *separately*, drops the rest (momentum encoder, queue, predictor, prototypes,
optimizer) and reports what it dropped. :func:`check_structure` then asserts the exact
missing/unexpected key sets and shapes against the architecture built *with* its classifier (what
the official ``main_lincls.py`` scripts assert), never a bare ``strict=False``. Only safetensors
and ``torch.load(weights_only=True)`` are used to read files.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from distillctl.errors import InputError, UsageError, unknown_name
from distillctl.teachers.archs import ArchSpec, build_head, classifier_prefix, infer_head_layout, strip_classifier
from distillctl.teachers.registry import KeyRules


@dataclass
class Converted:
    """A converted checkpoint: backbone and head state dicts plus what the converter did."""

    family: str
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None = None
    container: str = "(top level)"
    prefix: str = ""
    dropped: dict[str, int] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {"family": self.family, "container": self.container, "prefix": self.prefix, "dropped": self.dropped,
                "backbone_tensors": len(self.backbone), "head_tensors": len(self.head or {})}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Read a ``.safetensors`` file or a torch file with ``weights_only=True`` (never arbitrary pickles)."""
    if not path.is_file():
        raise InputError(f"teacher file not found: {path}")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # safetensors has its own error types
            raise InputError(f"unreadable safetensors file {path}: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, zip errors, EOFError
        text = str(exc).splitlines()[0][:200]
        hint = None
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            hint = ("the file pickles Python objects (e.g. a DINO *full* checkpoint's argparse Namespace); use the "
                    "backbone-only release, or convert it once where you trust it with `distillctl teacher convert`")
        raise InputError(f"cannot read {path} safely with torch.load(weights_only=True): {text}", hint=hint) from None
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _is_safetensors(path: Path) -> bool:
    """By name, or by content (8-byte header length then a JSON header), since ``.part`` files are checked too."""
    if path.name.removesuffix(".part").endswith(".safetensors"):
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def detect_family(obj: dict[str, Any]) -> str:
    """Best guess of a checkpoint's family from its keys ('plain' = a bare backbone state dict)."""
    keys = set(obj)
    if {"teacher", "student"} <= keys and isinstance(obj.get("teacher"), dict):
        return "dino"
    if isinstance(obj.get("state_dict"), dict):
        inner = obj["state_dict"]
        if any(k.startswith(("module.encoder_q.", "encoder_q.")) for k in inner):
            return "moco"
        if any(k.startswith(("module.base_encoder.", "base_encoder.")) for k in inner):
            return "moco3"
        if any(k.startswith(("module.encoder.", "encoder.")) for k in inner) and any("predictor" in k for k in inner):
            return "simsiam"
        if "cls_token" in inner or "module.backbone.cls_token" in inner or "backbone.cls_token" in inner:
            return "ibot"
        return "tv"
    if isinstance(obj.get("model"), dict) and "cls_token" in obj["model"]:
        return "mae"
    if any(k.startswith(("module.prototypes", "prototypes", "module.projection_head", "projection_head")) for k in keys):
        return "swav"
    if "mask_token" in keys and any(".ls1." in k for k in keys):
        return "dinov2"
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "plain"
    return "unknown"


def _open_container(obj: dict[str, Any], candidates: list[str], family: str) -> tuple[dict[str, Any], str]:
    for candidate in candidates or [""]:
        if candidate == "":
            return obj, "(top level)"
        if isinstance(obj.get(candidate), dict):
            return obj[candidate], candidate
    shown = ", ".join(sorted(map(str, obj))[:6])
    raise InputError(f"not a {family} checkpoint: expected a {' or '.join(repr(c) for c in candidates)} container, "
                     f"found top-level keys {shown} (looks like: {detect_family(obj)})")


def split_by_rules(obj: dict[str, Any], rules: KeyRules, family: str, model: nn.Module, spec: ArchSpec) -> Converted:
    """The shared part of every converter: container, backbone prefix, head prefix, drops."""
    state, container = _open_container(obj, rules.container, family)
    prefix = next((p for p in rules.keep_prefix if p == "" or any(str(k).startswith(p) for k in state)), None)
    if prefix is None:
        shown = ", ".join(sorted(map(str, state))[:4])
        raise InputError(f"not a {family} checkpoint: no keys under {' or '.join(rules.keep_prefix)} in {container} "
                         f"(keys like {shown}; looks like: {detect_family(obj)})")
    head_prefix = rules.head_prefix
    if head_prefix == "@classifier":
        head_prefix = classifier_prefix(spec, model)
    backbone: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    dropped: Counter[str] = Counter()
    for key, value in state.items():
        key = str(key)
        if not isinstance(value, torch.Tensor):
            dropped["<non-tensor>"] += 1
        elif not key.startswith(prefix):
            dropped[_group(key)] += 1
        elif head_prefix and key[len(prefix):].startswith(head_prefix):
            head[key[len(prefix) + len(head_prefix):]] = value
        elif any(key[len(prefix):].startswith(d) for d in rules.drop_prefix):
            dropped[prefix + _group(key[len(prefix):])] += 1
        else:
            backbone[key[len(prefix):]] = value
    return Converted(family, backbone, head or None, container, prefix, dict(sorted(dropped.items())))


def _group(key: str) -> str:
    """``module.encoder_k.layer1.0.conv1.weight`` -> ``module.encoder_k.``; ``module.queue`` -> ``module.queue``."""
    parts = key.split(".")
    depth = 2 if parts[0] == "module" else 1
    return ".".join(parts[:depth]) + ("." if len(parts) > depth else "")


# --- family converters ------------------------------------------------------------------------

def convert_moco(obj: dict, rules: KeyRules, model: nn.Module, spec: ArchSpec) -> Converted:
    """MoCo v1/v2 (and SEED/DisCo MoCo-format): ``module.encoder_q.*``; ``encoder_k``/queue dropped."""
    converted = split_by_rules(obj, rules, "moco", model, spec)
    if converted.head and set(converted.head) <= {"weight", "bias"}:  # v1: a single Linear saved as fc.weight
        converted.head = {f"0.{k}": v for k, v in converted.head.items()}
    return converted


def convert_moco3(obj: dict, rules: KeyRules, model: nn.Module, spec: ArchSpec) -> Converted:
    """MoCo v3: ``module.base_encoder.*``; head = the projector in ``fc``/``head``; momentum/predictor dropped."""
    return split_by_rules(obj, rules, "moco3", model, spec)


def convert_swav(obj: dict, rules: KeyRules, model: nn.Module, spec: ArchSpec) -> Converted:
    """SwAV / DeepCluster-v2: bare ``module.*`` dict; head = ``projection_head``; prototypes dropped."""
    return split_by_rules(obj, rules, "swav", model, spec)


def convert_tv(obj: dict, rules: KeyRules, model: nn.Module, spec: ArchSpec) -> Converted:
    """torchvision-keyed backbones (DINO-R50, Barlow Twins, VICReg, DenseCL's ``state_dict``)."""
    return split_by_rules(obj, rules, "tv", model, spec)


def convert_dino(obj: dict, rules: KeyRules, model: nn.Module, spec: ArchSpec) -> Converted:
    """DINO: backbone-only files are plain timm-keyed dicts; full checkpoints use ``teacher.backbone.*``."""
    return split_by_rules(obj, rules, "dino", model, spec)


def convert_simsiam(obj: dict, rules: KeyRules, model: nn.Module, spec: ArchSpec) -> Converted:
    """SimSiam: ``module.encoder.*``; head = the 3-layer projector ``fc``; predictor dropped."""
    return split_by_rules(obj, rules, "simsiam", model, spec)


def convert_mae(obj: dict, rules: KeyRules, model: nn.Module, spec: ArchSpec) -> Converted:
    """MAE: ``{"model": encoder}`` with timm names (fixed sin-cos pos-embed stored as a tensor)."""
    return split_by_rules(obj, rules, "mae", model, spec)


def convert_ibot(obj: dict, rules: KeyRules, model: nn.Module, spec: ArchSpec) -> Converted:
    """iBOT: ``{"state_dict": plain ViT keys}`` (teacher backbone); tolerates ``(module.)backbone.``."""
    return split_by_rules(obj, rules, "ibot", model, spec)


def convert_dinov2(obj: dict, rules: KeyRules, model: nn.Module, spec: ArchSpec) -> Converted:
    """DINOv2 -> timm ViT: drop ``mask_token``; registers -> ``reg_token`` with the CLS pos-embed folded
    into ``cls_token``; SwiGLU ``w12``/``w3`` -> ``fc1``/``fc2``; pos-embed resampled once to the
    model's grid (bicubic, antialias), the same single resample timm performs at load time."""
    from timm.layers import resample_abs_pos_embed

    converted = split_by_rules(obj, rules, "dinov2", model, spec)
    state = dict(converted.backbone)
    if state.pop("mask_token", None) is not None:
        converted.dropped["mask_token"] = 1
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, 0]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", key)
        renamed[re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", key)] = value
    target = getattr(model, "pos_embed", None)
    if "pos_embed" in renamed and target is not None and renamed["pos_embed"].shape != target.shape:
        prefix_tokens = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        renamed["pos_embed"] = resample_abs_pos_embed(renamed["pos_embed"], new_size=list(model.patch_embed.grid_size),
                                                      num_prefix_tokens=prefix_tokens, interpolation="bicubic", antialias=True)
    converted.backbone = renamed
    return converted


def convert_dinov3(obj: dict, rules: KeyRules, model: nn.Module, spec: ArchSpec) -> Converted:
    """DINOv3 (facebookresearch/dinov3 layout) -> timm: the ViTs into ``Eva`` (``vit_*_patch16_dinov3_qkvb``),
    the ConvNeXt distillations into ``ConvNeXt``; see :func:`_dinov3_vit_keys` and :func:`_dinov3_convnext_keys`."""
    converted = split_by_rules(obj, rules, "dinov3", model, spec)
    state = dict(converted.backbone)
    if "downsample_layers.0.0.weight" in state:
        converted.backbone = _dinov3_convnext_keys(state, converted.dropped)
    else:
        converted.backbone = _dinov3_vit_keys(state, converted.dropped)
    return converted


def _dinov3_vit_keys(state: dict[str, torch.Tensor], dropped: dict[str, int]) -> dict[str, torch.Tensor]:
    """Official DinoVisionTransformer keys -> timm Eva keys, checking what the rename assumes.

    ``storage_tokens`` -> ``reg_token``; ``ls1/ls2.gamma`` -> ``gamma_1/gamma_2``; the qkv bias (a
    ``LinearKMaskedBias``: bias * bias_mask, the mask zero on the key third) -> ``q_bias``/``v_bias`` after
    checking the mask is exactly 1/0/1; ``rope_embed.periods`` is checked against timm's RoPE periods
    (base 100) and dropped (timm computes them); ``mask_token`` and the training-only ``local_cls_norm`` dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in ("mask_token",) or key.startswith("local_cls_norm."):
            dropped[key.split(".")[0]] = dropped.get(key.split(".")[0], 0) + 1
            continue
        if key == "rope_embed.periods":
            _check_rope_periods(value, state)
            dropped[key] = 1
            continue
        if key.startswith("cls_norm.") or re.search(r"\.mlp\.w[123]\.", key):
            raise InputError(f"DINOv3 checkpoint has '{key}': untied CLS norms and SwiGLU (the 'plus' and 7B "
                             "models) are not supported; use ViT-S/B/L or a ConvNeXt")
        if key.endswith(".attn.qkv.bias_mask"):
            continue
        if key.endswith(".attn.qkv.bias"):
            mask = state.get(key + "_mask")
            dim = value.shape[0] // 3
            expected = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)]).to(value.dtype)
            if mask is not None and not torch.equal(mask.to(value.dtype), expected):
                raise InputError(f"DINOv3 checkpoint: {key}_mask is not the key-bias mask (1, 0, 1 by thirds)")
            if mask is None and value[dim:2 * dim].abs().max() > 0:
                raise InputError(f"DINOv3 checkpoint: {key} has a key bias but no bias_mask to remove it")
            out[key.replace("qkv.bias", "q_bias")] = value[:dim]
            out[key.replace("qkv.bias", "v_bias")] = value[2 * dim:]
            continue
        key = key.replace("storage_tokens", "reg_token").replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        out[key] = value
    return out


def _check_rope_periods(periods: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    """The file's RoPE periods must be base-100 ones (what timm's DINOv3 RoPE computes); anything else is refused."""
    quarter = periods.shape[0]
    expected = 100.0 ** (2 * torch.arange(quarter, dtype=torch.float64) / (2 * quarter))
    if not torch.allclose(periods.double(), expected, rtol=1e-5, atol=0):
        raise InputError("DINOv3 checkpoint: rope_embed.periods are not base-100 periods; this variant is not supported")


def _dinov3_convnext_keys(state: dict[str, torch.Tensor], dropped: dict[str, int]) -> dict[str, torch.Tensor]:
    """Official DINOv3 ConvNeXt keys -> timm ConvNeXt keys (``downsample_layers`` -> ``stem``/``stages.i.downsample``,
    ``dwconv``/``pwconv`` -> ``conv_dw``/``mlp.fc``, final ``norm`` -> ``head.norm``); ``norms.3`` is the same
    module as ``norm`` in the official model, checked equal and dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("norms."):
            twin = state.get("norm." + key.split(".", 2)[2])
            if twin is None or not torch.equal(twin, value):
                raise InputError(f"DINOv3 ConvNeXt checkpoint: {key} differs from the final norm it should share")
            dropped["norms."] = dropped.get("norms.", 0) + 1
            continue
        key = key.replace("downsample_layers.0.", "stem.")
        key = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", key)
        key = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
        key = key.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
        if key.startswith("norm."):
            key = "head." + key
        out[key] = value
    return out


ConverterFn = Callable[[dict, KeyRules, nn.Module, ArchSpec], Converted]
CONVERTERS: dict[str, ConverterFn] = {
    "moco": convert_moco, "moco3": convert_moco3, "swav": convert_swav, "tv": convert_tv, "dino": convert_dino,
    "dinov2": convert_dinov2, "simsiam": convert_simsiam, "mae": convert_mae, "ibot": convert_ibot,
    "dinov3": convert_dinov3,
}


def convert(obj: dict, family: str, rules: KeyRules, model: nn.Module, spec: ArchSpec) -> Converted:
    """Run the family's converter (BYOL/SimCLR need ``distillctl teacher convert``, never implicit)."""
    if family in ("byol", "simclr1"):
        raise UsageError(f"{family} checkpoints are not PyTorch files and are never unpickled implicitly",
                         hint="convert once with: distillctl teacher convert NAME FILE (needs the optional extra)")
    if family not in CONVERTERS:
        raise unknown_name("checkpoint format", family, list(CONVERTERS) + ["plain", "classifier"])
    return CONVERTERS[family](obj, rules, model, spec)


# --- structural check -------------------------------------------------------------------------

def check_structure(converted: Converted, spec: ArchSpec, model: nn.Module, expect_missing: list[str] | None,
                    expect_unexpected: list[str], head_layout: str | None, what: str) -> tuple[nn.Module, nn.Module | None]:
    """Assert exact missing/unexpected keys and shapes, then load strictly into the headless backbone
    (and the head, when ``head_layout`` is given). ``model`` is the arch *with* its classifier."""
    own = model.state_dict()
    classifier = classifier_prefix(spec, model)
    want_missing = set(expect_missing) if expect_missing is not None else {k for k in own if k.startswith(classifier)}
    missing, unexpected = set(own) - set(converted.backbone), set(converted.backbone) - set(own)
    if missing != want_missing or unexpected != set(expect_unexpected):
        parts = []
        if missing - want_missing:
            parts.append(f"missing {len(missing - want_missing)} keys (e.g. {', '.join(sorted(missing - want_missing)[:3])})")
        if want_missing - missing:
            parts.append(f"has keys the format never contains ({', '.join(sorted(want_missing - missing)[:3])})")
        if unexpected - set(expect_unexpected):
            extra = sorted(unexpected - set(expect_unexpected))
            parts.append(f"unexpected {len(extra)} keys (e.g. {', '.join(extra[:3])})")
        raise InputError(f"{what} does not have the structure of a {converted.family} {spec.label()} checkpoint: "
                         + "; ".join(parts or ["key sets differ"]))
    shapes = sorted(k for k in set(own) & set(converted.backbone) if own[k].shape != converted.backbone[k].shape)
    if shapes:
        key = shapes[0]
        raise InputError(f"{what}: {len(shapes)} tensors have the wrong shape for {spec.label()} (e.g. {key}: "
                         f"file {tuple(converted.backbone[key].shape)} vs model {tuple(own[key].shape)})")
    backbone = strip_classifier(spec, model)
    state = {k: v for k, v in converted.backbone.items() if k not in set(expect_unexpected)}
    result = backbone.load_state_dict(state, strict=False)
    leftover = set(result.missing_keys) - (want_missing - {k for k in own if k.startswith(classifier)})
    if leftover or result.unexpected_keys:
        raise InputError(f"{what}: backbone load left missing {sorted(leftover)[:3]} unexpected {result.unexpected_keys[:3]}")
    head_module = None
    if head_layout is not None:
        if not converted.head:
            raise InputError(f"{what}: no projection head found in the file (expected {head_layout})")
        found = infer_head_layout(converted.head)
        if found != head_layout.replace(" ", ""):
            raise InputError(f"{what}: projection head is {found}, expected {head_layout}")
        head_module = build_head(head_layout)
        from distillctl.students import load_state_dict_strict

        load_state_dict_strict(head_module, converted.head, what=f"{what} (projection head)")
    return backbone.eval(), head_module.eval() if head_module is not None else None
