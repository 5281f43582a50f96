"""Linear probe on frozen embeddings with a learning-rate × weight-decay sweep chosen on held-out train data.

Protocol (recorded verbatim in every result, identical for teacher and student):

1. Embeddings are extracted once (centre view, see :mod:`distillctl.eval.features`) and reused.
2. A stratified, seeded ``heldout_fraction`` of the *train* split is held out; the val split is never
   used for selection.
3. Features are standardised with the mean/variance of the rows the classifier is trained on
   (BatchNorm without affine, eps 1e-5) — the probe is then insensitive to the embedding scale,
   which differs between teachers and students.
4. Every (lr, weight decay) pair trains a linear layer (zero init) with mini-batch SGD, momentum 0.9,
   a cosine schedule and softmax cross-entropy, for a fixed number of epochs; weight decay applies to
   weights, not biases. All pairs train *simultaneously* as one batched (G, D, C) weight tensor on the
   same mini-batch order — independent problems, one pass over the data per step.
5. The pair with the best held-out top-1 wins (ties: first in grid order, lr ascending then wd
   ascending); it is retrained on the full train split and evaluated once on the val split.

Why SGD and not L-BFGS: with L2 regularisation the full-batch problem is convex, so L-BFGS would make
the lr axis meaningless and does not scale to ImageNet-sized feature sets; mini-batch SGD does both.
Reproducibility: zero init + a seeded ``torch.Generator`` for the order → identical numbers for the
same inputs, seed and device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distillctl.errors import InputError
from distillctl.eval.embedding_cache import EmbeddingCache
from distillctl.eval.features import align_classes, eval_transform

_BN_EPS = 1e-5


@dataclass(frozen=True)
class LinearProbeConfig:
    """Settings of the probe; every field is written into the result's protocol."""

    lrs: tuple[float, ...] = (0.01, 0.1, 1.0)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
    epochs: int = 50
    batch_size: int = 256
    momentum: float = 0.9
    heldout_fraction: float = 0.1
    seed: int = 0


@dataclass
class LinearProbeResult:
    """Val top-1 of the retrained probe, the chosen setting, the sweep table and the protocol."""

    top1: float
    lr: float
    weight_decay: float
    heldout_top1: float
    train_top1: float
    sweep: list[dict] = field(default_factory=list)
    protocol: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (fit, held-out): ``round(fraction·n_c)`` per class, at least one when n_c ≥ 2."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        n_held = int(round(fraction * len(members)))
        n_held = min(max(n_held, 1 if len(members) >= 2 else 0), len(members) - 1)
        held.append(members[:n_held])
        fit.append(members[n_held:])
    fit_idx, held_idx = np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))
    if len(held_idx) == 0:
        raise InputError("too few training images to hold out a selection split for the linear probe")
    return fit_idx, held_idx


def _standardiser(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = features.mean(dim=0)
    inv_std = torch.rsqrt(features.var(dim=0, unbiased=False) + _BN_EPS)
    return mean, inv_std


def train_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lrs: torch.Tensor,
    weight_decays: torch.Tensor,
    config: LinearProbeConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train G = len(lrs) linear classifiers at once on standardised ``features``.

    Returns (weights (G,D,C), biases (G,C), diverged (G,) bool). A setting whose parameters become
    non-finite stops updating and is reported as diverged instead of poisoning the others.
    """
    device = features.device
    n, dim = features.shape
    groups = lrs.numel()
    weights = torch.zeros(groups, dim, num_classes, device=device, requires_grad=True)
    biases = torch.zeros(groups, num_classes, device=device, requires_grad=True)
    velocity_w = torch.zeros_like(weights)
    velocity_b = torch.zeros_like(biases)
    diverged = torch.zeros(groups, dtype=torch.bool, device=device)
    lrs, weight_decays = lrs.to(device), weight_decays.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    batch_size = min(config.batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = steps_per_epoch * config.epochs
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x, y = features[idx], labels[idx]
            logits = torch.einsum("nd,gdc->gnc", x, weights) + biases[:, None, :]
            per_setting = F.cross_entropy(logits.reshape(-1, num_classes), y.repeat(groups), reduction="none")
            per_setting = per_setting.view(groups, -1).mean(dim=1)
            diverged |= ~torch.isfinite(per_setting)
            # Sum of per-setting mean losses: each setting's gradient is its own mean gradient.
            grad_w, grad_b = torch.autograd.grad(per_setting.sum(), (weights, biases))
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total_steps))  # cosine schedule, no warm-up
            with torch.no_grad():
                velocity_w.mul_(config.momentum).add_(grad_w + weight_decays[:, None, None] * weights)
                velocity_b.mul_(config.momentum).add_(grad_b)
                # where(), not a 0/1 multiply: a diverged setting's NaNs must not leak into its update mask.
                weights -= torch.where(diverged[:, None, None], 0.0, scale * lrs[:, None, None] * velocity_w)
                biases -= torch.where(diverged[:, None], 0.0, scale * lrs[:, None] * velocity_b)
                diverged |= ~(torch.isfinite(weights).flatten(1).all(1) & torch.isfinite(biases).all(1))
            step += 1
    return weights.detach(), biases.detach(), diverged


def _top1(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """Top-1 (percent) of each of the G classifiers."""
    logits = torch.einsum("nd,gdc->gnc", features, weights) + biases[:, None, :]
    return 100.0 * (logits.argmax(dim=2) == labels[None, :]).float().mean(dim=1)


def linear_probe_embeddings(
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    val_emb: torch.Tensor,
    val_labels: torch.Tensor,
    config: LinearProbeConfig | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> LinearProbeResult:
    """Run the protocol above; val accuracy of the probe retrained on all train rows with the chosen setting."""
    config = config or LinearProbeConfig()
    if not config.lrs or not config.weight_decays or config.epochs < 1 or config.batch_size < 1:
        raise InputError("linear probe needs at least one lr, one weight decay, epochs >= 1 and batch size >= 1")
    if not 0.0 < config.heldout_fraction < 1.0:
        raise InputError(f"heldout_fraction must be in (0, 1), got {config.heldout_fraction}")
    if train_emb.ndim != 2 or val_emb.ndim != 2 or train_emb.shape[1] != val_emb.shape[1]:
        raise InputError(f"embedding shapes do not match: train {tuple(train_emb.shape)}, val {tuple(val_emb.shape)}")
    device = torch.device(device)
    train_x = train_emb.to(device, torch.float32)
    train_y = train_labels.to(device, torch.int64)
    val_x = val_emb.to(device, torch.float32)
    val_y = val_labels.to(device, torch.int64)
    top_label = int(max(train_y.max().item(), val_y.max().item()))
    num_classes = num_classes or top_label + 1
    if top_label >= num_classes:
        raise InputError(f"label {top_label} out of range for num_classes={num_classes}")

    grid = [(lr, wd) for lr in sorted(config.lrs) for wd in sorted(config.weight_decays)]
    lrs = torch.tensor([lr for lr, _ in grid], dtype=torch.float32)
    wds = torch.tensor([wd for _, wd in grid], dtype=torch.float32)

    fit_idx, held_idx = stratified_holdout(train_y.cpu().numpy(), config.heldout_fraction, config.seed)
    fit_idx_t, held_idx_t = torch.from_numpy(fit_idx).to(device), torch.from_numpy(held_idx).to(device)
    mean, inv_std = _standardiser(train_x[fit_idx_t])
    fit_x, held_x = (train_x[fit_idx_t] - mean) * inv_std, (train_x[held_idx_t] - mean) * inv_std
    weights, biases, diverged = train_linear(fit_x, train_y[fit_idx_t], num_classes, lrs, wds, config)
    held_top1 = _top1(held_x, train_y[held_idx_t], weights, biases)
    held_top1 = torch.where(diverged, torch.full_like(held_top1, -1.0), held_top1)
    sweep = [{"lr": lr, "weight_decay": wd, "heldout_top1": round(float(acc), 4) if not bad else None,
              "diverged": bool(bad)} for (lr, wd), acc, bad in zip(grid, held_top1.tolist(), diverged.tolist())]
    if bool(diverged.all()):
        raise InputError("every linear-probe setting diverged", hint="lower the learning rates (--lrs)")
    best = int(torch.argmax(held_top1).item())  # first maximum = grid order tie-break
    best_lr, best_wd = grid[best]

    mean, inv_std = _standardiser(train_x)
    full_x, val_std = (train_x - mean) * inv_std, (val_x - mean) * inv_std
    weights, biases, diverged = train_linear(full_x, train_y, num_classes, lrs[best : best + 1], wds[best : best + 1], config)
    if bool(diverged[0]):
        raise InputError(f"the linear probe diverged when retrained on the full train split (lr={best_lr})",
                         hint="lower the learning rates (--lrs)")
    protocol = {
        "method": "linear-probe", "optimizer": "sgd", "momentum": config.momentum, "schedule": "cosine",
        "init": "zeros", "epochs": config.epochs, "batch_size": config.batch_size, "loss": "softmax cross-entropy",
        "weight_decay_on": "weights only", "standardize": f"train mean/var (BatchNorm without affine, eps {_BN_EPS})",
        "lrs": sorted(config.lrs), "weight_decays": sorted(config.weight_decays),
        "selection": f"stratified {config.heldout_fraction:.0%} of train held out, best top-1, ties in grid order",
        "heldout_fraction": config.heldout_fraction, "seed": config.seed, "retrain": "full train split",
        "n_train": int(train_x.shape[0]), "n_heldout": int(len(held_idx)), "n_val": int(val_x.shape[0]),
        "num_classes": int(num_classes), "dim": int(train_x.shape[1]),
    }
    return LinearProbeResult(
        top1=round(float(_top1(val_std, val_y, weights, biases)[0]), 4),
        lr=best_lr,
        weight_decay=best_wd,
        heldout_top1=round(float(held_top1[best]), 4),
        train_top1=round(float(_top1(full_x, train_y, weights, biases)[0]), 4),
        sweep=sweep,
        protocol=protocol,
    )


def linear_probe(
    encoder: Any,
    train_data: Any,
    val_data: Any,
    *,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 0.875,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    config: LinearProbeConfig | None = None,
    cache: EmbeddingCache | None = None,
    encoder_sha256: str | None = None,
    num_workers: int = 0,
) -> LinearProbeResult:
    """Embed both splits once (through ``cache`` when given) and run :func:`linear_probe_embeddings`.

    ``encoder`` is an ``nn.Module`` or any :class:`distillctl.eval.features.Encoder`; ``seed``
    overrides ``config.seed``. The eval transform is added to the recorded protocol.
    """
    from distillctl.eval.embedding_cache import embed_dataset_cached

    config = config or LinearProbeConfig()
    if hasattr(train_data, "classes") and hasattr(val_data, "classes"):
        val_data = align_classes(train_data, val_data)  # two ImageFolders index their own class lists
    if seed is not None:
        config = replace(config, seed=int(seed))
    kwargs = dict(cache=cache, encoder_sha256=encoder_sha256, input_size=input_size, mean=mean, std=std,
                  crop_pct=crop_pct, batch_size=batch_size, device=device, num_workers=num_workers)
    train_emb, train_labels, _ = embed_dataset_cached(encoder, train_data, **kwargs)
    val_emb, val_labels, _ = embed_dataset_cached(encoder, val_data, **kwargs)
    num_classes = len(getattr(train_data, "classes", []) or []) or None
    result = linear_probe_embeddings(train_emb, train_labels, val_emb, val_labels, config, num_classes=num_classes,
                                     device=device)
    result.protocol["transform"] = eval_transform(input_size, mean, std, crop_pct)
    return result
