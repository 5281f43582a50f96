"""The official DINOv3 architectures (facebookresearch/dinov3 ViT and ConvNeXt) written out from their definitions:
state dicts in the released key layout with random values, and plain-torch float64 forwards of the eval path."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def official_vit_state(dim: int, depth: int, heads: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """DinoVisionTransformer state dict (mask_k_bias, 4 storage tokens, LayerScale), random values."""
    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=generator) * scale

    head_dim = dim // heads
    state = {"cls_token": rnd(1, 1, dim, scale=1.0), "storage_tokens": rnd(1, 4, dim, scale=1.0),
             "mask_token": rnd(1, dim), "patch_embed.proj.weight": rnd(dim, 3, 16, 16, scale=0.02),
             "patch_embed.proj.bias": rnd(dim),
             "rope_embed.periods": 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)),
             "norm.weight": 1 + rnd(dim), "norm.bias": rnd(dim)}
    mask = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    for i in range(depth):
        p = f"blocks.{i}."
        state.update({p + "norm1.weight": 1 + rnd(dim), p + "norm1.bias": rnd(dim),
                      p + "attn.qkv.weight": rnd(3 * dim, dim), p + "attn.qkv.bias": rnd(3 * dim, scale=0.5),
                      p + "attn.qkv.bias_mask": mask.clone(), p + "attn.proj.weight": rnd(dim, dim),
                      p + "attn.proj.bias": rnd(dim), p + "ls1.gamma": rnd(dim, scale=0.5),
                      p + "norm2.weight": 1 + rnd(dim), p + "norm2.bias": rnd(dim),
                      p + "mlp.fc1.weight": rnd(4 * dim, dim), p + "mlp.fc1.bias": rnd(4 * dim),
                      p + "mlp.fc2.weight": rnd(dim, 4 * dim), p + "mlp.fc2.bias": rnd(dim),
                      p + "ls2.gamma": rnd(dim, scale=0.5)})
    return state


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def official_vit_cls(state: dict[str, torch.Tensor], images: torch.Tensor, heads: int, eps: float = 1e-5) -> torch.Tensor:
    """The upstream eval forward: patchify, [CLS, 4 storage, patches], axial RoPE on patch queries/keys
    (coords at patch centres in [-1, 1], 'separate' normalisation), masked key bias, LayerScale, final norm, CLS."""
    s = {k: v.double() for k, v in state.items()}
    x = F.conv2d(images, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=16)
    batch, dim, height, width = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls = s["cls_token"] + 0 * s["mask_token"]
    x = torch.cat([cls.expand(batch, -1, -1), s["storage_tokens"].expand(batch, -1, -1), x], dim=1)
    prefix, head_dim = 5, dim // heads
    coords_h = torch.arange(0.5, height, dtype=torch.float64) / height
    coords_w = torch.arange(0.5, width, dtype=torch.float64) / width
    coords = 2.0 * torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
    angles = (2 * math.pi * coords[:, :, None] / s["rope_embed.periods"][None, None, :]).flatten(1, 2).tile(2)
    sin, cos = angles.sin(), angles.cos()
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps)
        qkv = h @ s[p + "attn.qkv.weight"].T + s[p + "attn.qkv.bias"] * s[p + "attn.qkv.bias_mask"]
        q, k, v = qkv.view(batch, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q = torch.cat([q[:, :, :prefix], q[:, :, prefix:] * cos + _rotate_half(q[:, :, prefix:]) * sin], dim=2)
        k = torch.cat([k[:, :, :prefix], k[:, :, prefix:] * cos + _rotate_half(k[:, :, prefix:]) * sin], dim=2)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        out = (attention @ v).transpose(1, 2).reshape(batch, -1, dim)
        x = x + s[p + "ls1.gamma"] * (out @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"])
        h = F.layer_norm(x, (dim,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps)
        h = F.gelu(h @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"]) @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
        x = x + s[p + "ls2.gamma"] * h
    return F.layer_norm(x, (dim,), s["norm.weight"], s["norm.bias"], eps)[:, 0]


def official_convnext_state(depths, dims, generator: torch.Generator) -> dict[str, torch.Tensor]:
    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=generator) * scale

    state = {"downsample_layers.0.0.weight": rnd(dims[0], 3, 4, 4, scale=0.1), "downsample_layers.0.0.bias": rnd(dims[0]),
             "downsample_layers.0.1.weight": 1 + rnd(dims[0]), "downsample_layers.0.1.bias": rnd(dims[0])}
    for i in range(1, 4):
        state.update({f"downsample_layers.{i}.0.weight": 1 + rnd(dims[i - 1]), f"downsample_layers.{i}.0.bias": rnd(dims[i - 1]),
                      f"downsample_layers.{i}.1.weight": rnd(dims[i], dims[i - 1], 2, 2), f"downsample_layers.{i}.1.bias": rnd(dims[i])})
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            state.update({p + "dwconv.weight": rnd(dim, 1, 7, 7, scale=0.1), p + "dwconv.bias": rnd(dim),
                          p + "norm.weight": 1 + rnd(dim), p + "norm.bias": rnd(dim),
                          p + "pwconv1.weight": rnd(4 * dim, dim), p + "pwconv1.bias": rnd(4 * dim),
                          p + "pwconv2.weight": rnd(dim, 4 * dim), p + "pwconv2.bias": rnd(dim),
                          p + "gamma": rnd(dim, scale=0.5)})
    state["norm.weight"], state["norm.bias"] = 1 + rnd(dims[-1]), rnd(dims[-1])
    state["norms.3.weight"], state["norms.3.bias"] = state["norm.weight"].clone(), state["norm.bias"].clone()
    return state


def _layer_norm_channels_first(x, weight, bias, eps=1e-6):
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    return weight[:, None, None] * (x - mean) / torch.sqrt(var + eps) + bias[:, None, None]


def official_convnext_pooled(state, images, depths) -> torch.Tensor:
    """Upstream ConvNeXt eval output x_norm_clstoken: LayerNorm of the average-pooled last stage."""
    s = {k: v.double() for k, v in state.items()}
    x = F.conv2d(images, s["downsample_layers.0.0.weight"], s["downsample_layers.0.0.bias"], stride=4)
    x = _layer_norm_channels_first(x, s["downsample_layers.0.1.weight"], s["downsample_layers.0.1.bias"])
    for i, depth in enumerate(depths):
        if i > 0:
            x = _layer_norm_channels_first(x, s[f"downsample_layers.{i}.0.weight"], s[f"downsample_layers.{i}.0.bias"])
            x = F.conv2d(x, s[f"downsample_layers.{i}.1.weight"], s[f"downsample_layers.{i}.1.bias"], stride=2)
        for j in range(depth):
            p = f"stages.{i}.{j}."
            y = F.conv2d(x, s[p + "dwconv.weight"], s[p + "dwconv.bias"], padding=3, groups=x.shape[1]).permute(0, 2, 3, 1)
            y = F.layer_norm(y, (x.shape[1],), s[p + "norm.weight"], s[p + "norm.bias"], 1e-6)
            y = F.gelu(y @ s[p + "pwconv1.weight"].T + s[p + "pwconv1.bias"]) @ s[p + "pwconv2.weight"].T + s[p + "pwconv2.bias"]
            x = x + (s[p + "gamma"] * y).permute(0, 3, 1, 2)
    return F.layer_norm(x.mean([-2, -1]), (x.shape[1],), s["norm.weight"], s["norm.bias"], 1e-6)


class OfficialReference(nn.Module):
    """A reference forward as a module (float32 in and out) for the converter cases."""

    def __init__(self, forward_fn, state: dict[str, torch.Tensor], **kwargs) -> None:
        super().__init__()
        self.forward_fn, self.state, self.kwargs = forward_fn, state, kwargs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_fn(self.state, images.double(), **self.kwargs).float()
