"""The converted-teacher store: ``backbone.safetensors`` (+ ``head.safetensors``) and ``meta.json``.

A teacher is converted once; later loads read only these files. ``backbone.safetensors`` holds
plain architecture keys (loadable by ``timm.create_model(arch, num_classes=0)`` / torchvision with
``fc`` removed), and its sha256 is the teacher's identity for the feature cache. ``meta.json`` is
written last, so a folder without it is an unfinished conversion and is redone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillctl._infra import atomic_path, atomic_write_text, sha256_file
from distillctl.errors import GateError, InputError
from distillctl.teachers.archs import ArchSpec, build_backbone, build_head

if TYPE_CHECKING:  # reading a manifest (teacher list) needs no torch
    import torch
    from torch import nn


META = "meta.json"
BACKBONE = "backbone.safetensors"
HEAD = "head.safetensors"
STORE_VERSION = 1


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> str:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return sha256_file(path)


def save_converted(folder: Path, backbone: nn.Module, head: nn.Module | None, head_layout: str | None,
                   meta: dict[str, Any]) -> dict[str, Any]:
    """Write the converted weights and then the manifest; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).unlink(missing_ok=True)  # invalidate first: a crash below leaves no stale manifest
    tag = {"format": "distillctl-teacher", "arch": json.dumps(meta["arch"], sort_keys=True)}
    manifest = dict(meta)
    manifest["store_version"] = STORE_VERSION
    manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest["backbone"] = {"file": BACKBONE, "sha256": _save(backbone.state_dict(), folder / BACKBONE, tag),
                            "num_params": sum(p.numel() for p in backbone.parameters())}
    if head is not None:
        manifest["head"] = {"file": HEAD, "layout": head_layout, "sha256": _save(head.state_dict(), folder / HEAD, tag)}
    else:
        (folder / HEAD).unlink(missing_ok=True)
        manifest["head"] = None
    atomic_write_text(folder / META, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / META
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("store_version") == STORE_VERSION else None


@dataclass
class Stored:
    backbone: nn.Module
    head: nn.Module | None
    manifest: dict[str, Any]
    sha256: str


def load_converted(folder: Path, manifest: dict[str, Any]) -> Stored:
    """Load a converted teacher strictly, re-hashing the backbone file against the manifest."""
    from safetensors.torch import load_file

    from distillctl.students import load_state_dict_strict

    backbone_path = folder / BACKBONE
    if not backbone_path.is_file():
        raise InputError(f"converted teacher {backbone_path} is missing")
    sha = sha256_file(backbone_path)
    if sha != manifest["backbone"]["sha256"]:
        raise GateError(f"converted teacher {backbone_path} changed since conversion (sha256 {sha[:16]}… != "
                        f"{manifest['backbone']['sha256'][:16]}…)", hint=f"delete {folder} and load the teacher again")
    spec = ArchSpec(**manifest["arch"])
    backbone = build_backbone(spec)
    load_state_dict_strict(backbone, load_file(str(backbone_path)), what=str(backbone_path))
    head = None
    if manifest.get("head"):
        head_path = folder / HEAD
        if not head_path.is_file() or sha256_file(head_path) != manifest["head"]["sha256"]:
            raise GateError(f"converted teacher head {head_path} is missing or changed", hint=f"delete {folder} and retry")
        head = build_head(manifest["head"]["layout"])
        load_state_dict_strict(head, load_file(str(head_path)), what=str(head_path))
    return Stored(backbone.eval(), head.eval() if head is not None else None, manifest, sha)
