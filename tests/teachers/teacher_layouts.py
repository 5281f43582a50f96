"""Checkpoints in each family's exact on-disk layout, written from random reference models.

Each case keeps the real registry entry's rules (container, prefixes, family) and swaps in a small
architecture of the same key layout (torchvision resnet18, a 2-block ViT), so the whole download ->
convert -> load path runs in seconds. References: ``backbone(x)`` and ``head(backbone(x))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from distillctl.teachers.wide_resnet import wide_resnet
from teacher_helpers import mlp, perturbed, prefixed, randomise_bn, resnet18_with_head, vit_tiny

RESNET18 = {"builder": "torchvision", "name": "resnet18", "kwargs": {}}
OPTIMIZER = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "params": [0, 1]}]}


@dataclass
class Case:
    family: str
    base: str  # the real registry entry whose rules are used
    checkpoint: Any
    backbone: nn.Module
    head: nn.Module | None
    overrides: dict[str, Any] = field(default_factory=dict)
    input_size: int = 32


def _head_entry(layout: str, head_dim: int) -> dict[str, Any]:
    return {"head": {"layout": layout}, "head_dim": head_dim}


def moco_v2() -> Case:
    head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    encoder_q = resnet18_with_head(head, seed=1)
    state = prefixed(encoder_q.state_dict(), "module.encoder_q.") | prefixed(perturbed(encoder_q).state_dict(), "module.encoder_k.")
    state |= {"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    checkpoint = {"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": OPTIMIZER}
    backbone = resnet18_with_head(None, seed=0)
    backbone.load_state_dict({k: v for k, v in encoder_q.state_dict().items() if not k.startswith("fc.")})
    return Case("moco", "mocov2-r50-800ep", checkpoint, backbone, head.eval(),
                {"arch": RESNET18, "embed_dim": 512} | _head_entry("Linear(512,512)-ReLU-Linear(512,128)", 128))


def moco_v1() -> Case:
    head = nn.Linear(512, 128)
    encoder_q = resnet18_with_head(head, seed=2)
    state = prefixed(encoder_q.state_dict(), "module.encoder_q.") | prefixed(perturbed(encoder_q).state_dict(), "module.encoder_k.")
    state |= {"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    backbone = resnet18_with_head(None, seed=0)
    backbone.load_state_dict({k: v for k, v in encoder_q.state_dict().items() if not k.startswith("fc.")})
    return Case("moco", "mocov1-r50-200ep", {"epoch": 200, "arch": "resnet50", "state_dict": state}, backbone, head.eval(),
                {"arch": RESNET18, "embed_dim": 512} | _head_entry("Linear(512,128)", 128))


def moco3_resnet() -> Case:
    head = mlp([512, 64, 32])
    base = resnet18_with_head(head, seed=3)
    predictor = mlp([32, 64, 32])
    state = prefixed(base.state_dict(), "module.base_encoder.") | prefixed(perturbed(base).state_dict(), "module.momentum_encoder.")
    state |= prefixed(predictor.state_dict(), "module.predictor.")
    checkpoint = {"epoch": 1000, "arch": "resnet50", "state_dict": state, "optimizer": OPTIMIZER,
                  "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}}
    backbone = resnet18_with_head(None, seed=0)
    backbone.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("fc.")})
    return Case("moco3", "mocov3-r50-1000ep", checkpoint, backbone, head.eval(),
                {"arch": RESNET18, "embed_dim": 512} | _head_entry("Linear(512,64,nobias)-BN(64)-ReLU-Linear(64,32,nobias)-BN(32,noaffine)", 32))


VIT_S12 = {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 12}


def moco3_vit() -> Case:
    backbone = vit_tiny(seed=4, num_heads=12)
    head = randomise_bn(mlp([48, 64, 64, 32]), 4).eval()
    predictor = mlp([32, 64, 32])
    encoder = prefixed(backbone.state_dict(), "module.base_encoder.") | prefixed(head.state_dict(), "module.base_encoder.head.")
    momentum = {k.replace("base_encoder", "momentum_encoder"): v + 0.05 if v.is_floating_point() else v for k, v in encoder.items()}
    state = encoder | momentum | prefixed(predictor.state_dict(), "module.predictor.")
    checkpoint = {"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": OPTIMIZER, "scaler": {"scale": 1024.0}}
    layout = "Linear(48,64,nobias)-BN(64)-ReLU-Linear(64,64,nobias)-BN(64)-ReLU-Linear(64,32,nobias)-BN(32,noaffine)"
    arch = {"builder": "timm", "name": "vit_small_patch16_224", "kwargs": VIT_S12}
    return Case("moco3", "mocov3-vits16-300ep", checkpoint, backbone, head, {"arch": arch, "embed_dim": 48} | _head_entry(layout, 32))


def _swav(backbone: nn.Module, arch: dict, embed: int, base: str, seed: int) -> Case:
    head = randomise_bn(nn.Sequential(nn.Linear(embed, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16)), seed).eval()
    prototypes = nn.Linear(16, 30, bias=False)
    state = prefixed(backbone.state_dict(), "module.") | prefixed(head.state_dict(), "module.projection_head.")
    state |= prefixed(prototypes.state_dict(), "module.prototypes.")
    return Case("swav", base, state, backbone, head, {"arch": arch, "embed_dim": embed} | _head_entry(
        f"Linear({embed},64)-BN(64)-ReLU-Linear(64,16)", 16))


def swav() -> Case:
    return _swav(resnet18_with_head(None, seed=5), RESNET18, 512, "swav-r50-800ep", 5)


def swav_w2() -> Case:
    torch.manual_seed(6)
    kwargs = {"layers": [1, 1, 1, 1], "widen": 2, "width": 8}
    backbone = randomise_bn(wide_resnet(num_classes=0, **kwargs), 6).eval()
    return _swav(backbone, {"builder": "distillctl", "name": "wide_resnet", "kwargs": kwargs}, backbone.num_features,
                 "swav-r50w2-400ep", 6)


def tv_dino_r50() -> Case:
    backbone = resnet18_with_head(None, seed=7)
    return Case("tv", "dino-r50", dict(backbone.state_dict()), backbone, None, {"arch": RESNET18, "embed_dim": 512})


def tv_densecl() -> Case:
    backbone = resnet18_with_head(None, seed=8)
    checkpoint = {"state_dict": dict(backbone.state_dict()), "author": "DenseCL"}
    return Case("tv", "densecl-r50-in1k-200ep", checkpoint, backbone, None, {"arch": RESNET18, "embed_dim": 512})


VIT_S6 = {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 6}


def dino_vit() -> Case:
    backbone = vit_tiny(seed=9)
    arch = {"builder": "timm", "name": "vit_small_patch16_224", "kwargs": VIT_S6}
    return Case("dino", "dino-vits16", dict(backbone.state_dict()), backbone, None, {"arch": arch, "embed_dim": 48})


def dinov2() -> Case:
    backbone = vit_tiny("vit_small_patch14_dinov2", seed=10, img_size=28)
    state = dict(backbone.state_dict()) | {"mask_token": torch.randn(1, 48)}
    arch = {"builder": "timm", "name": "vit_small_patch14_dinov2", "kwargs": dict(VIT_S6, img_size=28)}
    return Case("dinov2", "dinov2-vits14", state, backbone, None, {"arch": arch, "embed_dim": 48}, input_size=28)


def simsiam() -> Case:
    projector = nn.Sequential(nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(),
                              nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(),
                              nn.Linear(512, 64), nn.BatchNorm1d(64, affine=False))
    encoder = resnet18_with_head(projector, seed=11)
    predictor = nn.Sequential(nn.Linear(64, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 64))
    state = prefixed(encoder.state_dict(), "module.encoder.") | prefixed(predictor.state_dict(), "module.predictor.")
    checkpoint = {"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": OPTIMIZER}
    backbone = resnet18_with_head(None, seed=0)
    backbone.load_state_dict({k: v for k, v in encoder.state_dict().items() if not k.startswith("fc.")})
    layout = "Linear(512,512,nobias)-BN(512)-ReLU-Linear(512,512,nobias)-BN(512)-ReLU-Linear(512,64)-BN(64,noaffine)"
    return Case("simsiam", "simsiam-r50-100ep", checkpoint, backbone, projector.eval(), {"arch": RESNET18, "embed_dim": 512} | _head_entry(layout, 64))


def mae() -> Case:
    backbone = vit_tiny("vit_base_patch16_224", seed=12, num_heads=4)
    arch = {"builder": "timm", "name": "vit_base_patch16_224", "kwargs": dict(VIT_S6, num_heads=4)}
    return Case("mae", "mae-vitb16", {"model": dict(backbone.state_dict())}, backbone, None, {"arch": arch, "embed_dim": 48})


def ibot() -> Case:
    backbone = vit_tiny(seed=13)
    arch = {"builder": "timm", "name": "vit_small_patch16_224", "kwargs": VIT_S6}
    return Case("ibot", "ibot-vits16", {"state_dict": dict(backbone.state_dict())}, backbone, None, {"arch": arch, "embed_dim": 48})


def dinov3_vit() -> Case:
    from dinov3_reference import OfficialReference, official_vit_cls, official_vit_state

    state = official_vit_state(64, 2, 2, torch.Generator().manual_seed(14))
    arch = {"builder": "timm", "name": "vit_small_patch16_dinov3_qkvb",
            "kwargs": {"global_pool": "token", "embed_dim": 64, "depth": 2, "num_heads": 2}}
    return Case("dinov3", "dinov3-vits16", state, OfficialReference(official_vit_cls, state, heads=2), None,
                {"arch": arch, "embed_dim": 64, "published_hash": None})


CASES: dict[str, Callable[[], Case]] = {
    "moco-v2": moco_v2, "moco-v1": moco_v1, "moco3-resnet": moco3_resnet, "moco3-vit": moco3_vit, "swav": swav,
    "swav-w2": swav_w2, "tv-dino-r50": tv_dino_r50, "tv-densecl": tv_densecl, "dino": dino_vit, "dinov2": dinov2,
    "simsiam": simsiam, "mae": mae, "ibot": ibot, "dinov3": dinov3_vit,
}
CASE_FAMILIES = {"moco-v2": "moco", "moco-v1": "moco", "moco3-resnet": "moco3", "moco3-vit": "moco3", "swav": "swav",
                 "swav-w2": "swav", "tv-dino-r50": "tv", "tv-densecl": "tv", "dino": "dino", "dinov2": "dinov2",
                 "simsiam": "simsiam", "mae": "mae", "ibot": "ibot", "dinov3": "dinov3"}
