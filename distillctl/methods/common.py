"""Pieces shared by methods: MLP heads, a DDP-aware ring-buffer queue, EMA, similarity softmax.

Written once here so that no method re-implements them (architecture.md: "no copy-paste between
methods").
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distillctl._infra import all_gather_concat


def mlp(dims: Sequence[int], *, norm_after: Sequence[int] | None = None, last_bn: bool = False,
        bias: bool = True) -> nn.Sequential:
    """Linear layers ``dims[0] → dims[1] → …``; BatchNorm+ReLU after the hidden layers listed in
    ``norm_after`` (default: every hidden layer), none after the last unless ``last_bn``."""
    hidden = range(len(dims) - 2) if norm_after is None else norm_after
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        if i < len(dims) - 2 and i in hidden:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        elif i < len(dims) - 2:
            pass  # no nonlinearity between linear layers listed as plain (SimReg's two halves)
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


def mlp_relu(dims: Sequence[int]) -> nn.Sequential:
    """Linear–ReLU–…–Linear without BatchNorm (MoCo v2 / SEED / DisCo projection heads)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FeatureQueue(nn.Module):
    """FIFO ring buffer of K×D embeddings with a pointer; both are buffers (checkpointed).

    ``enqueue`` all-gathers across ranks first so every rank holds the same queue. Rows are
    written at ``ptr`` and wrap around the end (a batch that does not divide K is split).
    ``filled`` counts valid rows until the queue is full, so methods can ignore unwritten rows.

    The pointer and fill count are also kept as Python ints (read from the buffers once, after construction or
    a checkpoint load, then advanced by the host-known batch size), so an enqueue never reads a device tensor
    back to the host: no per-step synchronisation on a GPU.
    """

    def __init__(self, size: int, dim: int, *, normalize_init: bool = True, init: str = "random") -> None:
        super().__init__()
        if size <= 0:
            raise ValueError("queue size must be positive")
        data = torch.randn(size, dim) if init == "random" else torch.zeros(size, dim)
        if normalize_init and init == "random":
            data = F.normalize(data, dim=1)
        self.register_buffer("data", data)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._host: tuple[int, int] | None = None  # (ptr, filled) mirrored on the host; None: read the buffers

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None  # the buffers changed: re-read them once

    def _pointers(self) -> tuple[int, int]:
        if self._host is None:
            self._host = (int(self.ptr), int(self.filled))
        return self._host

    @property
    def size(self) -> int:
        return self.data.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, gather: bool = True) -> None:
        keys = all_gather_concat(keys.detach()) if gather else keys.detach()
        keys = keys.to(self.data.dtype)
        if keys.shape[0] >= self.size:
            keys = keys[-self.size :]
        n = keys.shape[0]
        start, filled = self._pointers()
        end = start + n
        if end <= self.size:
            self.data[start:end] = keys
        else:
            first = self.size - start
            self.data[start:] = keys[:first]
            self.data[: n - first] = keys[first:]
        self._host = (end % self.size, min(self.size, filled + n))
        self.ptr.fill_(self._host[0])
        self.filled.fill_(self._host[1])

    def valid(self) -> torch.Tensor:
        """Rows written so far (the whole queue once it has wrapped)."""
        filled = self._pointers()[1]
        return self.data if filled >= self.size else self.data[:filled]


class EMA(nn.Module):
    """Exponential moving average copy of a module (momentum encoder). Not trained by the optimizer."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(source)
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, source: nn.Module, momentum: float) -> None:
        for ema_param, param in zip(self.module.parameters(), source.parameters()):
            ema_param.mul_(momentum).add_(param.detach(), alpha=1 - momentum)
        for ema_buffer, buffer in zip(self.module.buffers(), source.buffers()):
            ema_buffer.copy_(buffer)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL/DINO schedule: momentum rises from ``base`` to 1 along a half cosine (progress in [0,1])."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1) / 2


def soft_cross_entropy(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """mean_b( −Σ_j p_target[b,j] · log softmax(student_logits)[b,j] )."""
    return -(target_probs * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()


def info_nce(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo-style InfoNCE: logits [q·k+, q·Q] / τ, target index 0. Inputs L2-normalised."""
    positive_logit = (query * positive).sum(dim=1, keepdim=True)
    negative_logits = query @ negatives.t()
    logits = torch.cat([positive_logit, negative_logits], dim=1) / temperature
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels)
