"""Optimizers (SGD, AdamW, LARS) and the warmup + cosine learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017).

    Biases and 1-d (normalisation) parameters get neither weight decay nor adaptation, as in SimCLR/BYOL/SMD.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if param.ndim > 1:
                    grad = grad.add(param, alpha=group["weight_decay"])
                    param_norm, grad_norm = torch.norm(param), torch.norm(grad)
                    trust = torch.where((param_norm > 0) & (grad_norm > 0),
                                        group["eta"] * param_norm / grad_norm, torch.ones_like(param_norm))
                    grad = grad.mul(trust)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(grad)
                param.add_(buffer, alpha=-group["lr"])


def build_optimizer(name: str, parameters: list[nn.Parameter], lr: float, weight_decay: float,
                    momentum: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "lars":
        return LARS(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name}")


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup for ``warmup_steps``, then half-cosine from ``base_lr`` to ``min_ratio·base_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
