"""Dense probe: a per-location linear classifier on frozen feature maps, on 2×2 mosaics of labelled images.

Global kNN cannot show what dense distillation (PCD, ``dense-reg``) is for; this probe asks whether each
location of the feature map knows *what is there*. The task, ``mosaic-2x2``, is built from any labelled split:

1. **Images.** Every image is reduced to its centre view at the model's input size ``S`` (the transform of
   kNN and the linear probe: ``crop_pct`` box of the short side, bilinear + antialias, then normalised).
2. **Mosaics.** A mosaic is ``2S × 2S``: four centre views tiled 2×2 (top-left, top-right, bottom-left,
   bottom-right). The images of consecutive mosaics are consecutive entries of a seeded permutation of the
   split (``torch.Generator`` seeded ``seed`` for train, ``seed + 1`` for val; a new permutation when one is
   used up), so each image appears once per pass. Train mosaics come from the train split, val mosaics from
   the val split.
3. **Labels.** Every pixel of a quadrant carries the class of the image in it.
4. **Features.** The frozen map of the last stage: CNNs ``forward_features`` (B×C×h×w); ViTs their patch
   tokens after the final norm, prefix (CLS/register) tokens dropped, reshaped to the patch grid; a ViT's
   position embeddings are resampled once for ``2S`` inputs (:mod:`distillctl.resolution`). BatchNorm in eval.
5. **Classifier.** One linear layer shared by all locations (a 1×1 convolution) on features standardised
   with the train mean/variance, trained with the linear probe's SGD (zero init, momentum 0.9, cosine,
   softmax cross-entropy) on one label per feature cell: the class of the quadrant holding the cell's centre.
   The lr × weight-decay pair is chosen on the last ``heldout_fraction`` of the train mosaics (best cell
   accuracy, ties in grid order), then retrained on all train mosaics.
6. **Metrics.** Val logits are upsampled bilinearly (align_corners=False) to ``2S × 2S``; the per-pixel argmax
   gives pixel accuracy and mIoU (mean over classes with a non-empty union of prediction and truth).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distillctl.data.views import ViewSpec, apply_view_uint8, normalize, sample_view
from distillctl.errors import InputError
from distillctl.eval.linear import LinearProbeConfig, _standardiser, train_linear

TASK = "mosaic-2x2"


@dataclass(frozen=True)
class DenseProbeConfig:
    """Settings of the dense probe; every field is written into the result's protocol."""

    train_mosaics: int = 1000
    val_mosaics: int = 500
    lrs: tuple[float, ...] = (0.01, 0.1, 1.0)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3)
    epochs: int = 20
    batch_size: int = 1024  # feature cells per SGD step
    momentum: float = 0.9
    heldout_fraction: float = 0.1
    seed: int = 0


@dataclass
class DenseProbeResult:
    """Val mIoU and pixel accuracy (percent) of the retrained probe, the chosen setting and the protocol."""

    miou: float
    pixel_accuracy: float
    lr: float
    weight_decay: float
    heldout_cell_accuracy: float
    feature_grid: list[int]
    per_class_iou: list[float | None] = field(default_factory=list)
    sweep: list[dict] = field(default_factory=list)
    protocol: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --- the task ----------------------------------------------------------------------------------

def mosaic_indices(n_images: int, n_mosaics: int, seed: int) -> torch.Tensor:
    """(n_mosaics, 4) image indices: consecutive entries of seeded permutations of the split."""
    if n_images < 4:
        raise InputError(f"a 2x2 mosaic needs at least 4 images, the split has {n_images}")
    generator = torch.Generator().manual_seed(int(seed))
    needed = 4 * n_mosaics
    order = torch.cat([torch.randperm(n_images, generator=generator) for _ in range(math.ceil(needed / n_images))])
    return order[:needed].view(n_mosaics, 4)


def tile(quadrants: torch.Tensor) -> torch.Tensor:
    """(M, 4, C, S, S) → (M, C, 2S, 2S): quadrants 0 1 / 2 3."""
    top = torch.cat([quadrants[:, 0], quadrants[:, 1]], dim=-1)
    bottom = torch.cat([quadrants[:, 2], quadrants[:, 3]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def label_map(quadrant_labels: torch.Tensor, size: int) -> torch.Tensor:
    """(M, 4) quadrant classes → (M, 2S, 2S) per-pixel classes for mosaics of side ``2 * size``."""
    block = quadrant_labels.view(-1, 2, 2)
    return block.repeat_interleave(size, dim=1).repeat_interleave(size, dim=2)


def cell_labels(quadrant_labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(M, 4) → (M, h, w): the class of the quadrant that holds each feature cell's centre."""
    rows = ((torch.arange(grid[0]) + 0.5) * 2 / grid[0]).floor().clamp(max=1).long()
    cols = ((torch.arange(grid[1]) + 0.5) * 2 / grid[1]).floor().clamp(max=1).long()
    block = quadrant_labels.view(-1, 2, 2)
    return block[:, rows][:, :, cols]


def centre_views(dataset: Any, indices: torch.Tensor, size: int, crop_pct: float) -> dict[int, torch.Tensor]:
    """uint8 centre views of the images ``indices`` uses (each decoded once)."""
    spec = ViewSpec(size=int(size), family="centre", crop_pct=float(crop_pct))
    views = {}
    for index in sorted(set(indices.flatten().tolist())):
        image = dataset.load_image(index)
        views[index] = apply_view_uint8(image, sample_view(spec, int(image.shape[-2]), int(image.shape[-1]), None), spec)
    return views


# --- features ----------------------------------------------------------------------------------

def dense_model(model: nn.Module, mosaic_size: int) -> nn.Module:
    """The model ready for ``mosaic_size`` inputs: a copy with resampled position embeddings for fixed-grid ViTs."""
    from distillctl.resolution import adapt_to_size, patch_grid

    grid = patch_grid(model)
    if grid is None or grid.dynamic:
        return model
    adapted = copy.deepcopy(model)
    adapt_to_size(adapted, mosaic_size, "dense probe model")
    return adapted


def feature_map(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) last-stage map: a CNN's ``forward_features``, or a ViT's patch tokens on their grid."""
    if not hasattr(model, "forward_features"):
        raise InputError(f"{type(model).__name__} has no forward_features: the dense probe needs a timm backbone")
    out = model.forward_features(images)
    if out.ndim == 3:  # ViT tokens (B, prefix + h*w, C)
        tokens = out[:, int(getattr(model, "num_prefix_tokens", 1)):]
        embed = getattr(model, "patch_embed", None)
        patch = embed.patch_size if embed is not None else None
        if patch is None:
            side = int(math.isqrt(tokens.shape[1]))
            grid = (side, tokens.shape[1] // max(side, 1))
        else:
            grid = (images.shape[-2] // patch[0], images.shape[-1] // patch[1])
        if grid[0] * grid[1] != tokens.shape[1]:
            raise InputError(f"cannot lay {tokens.shape[1]} tokens on a {grid[0]}x{grid[1]} patch grid")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
    if out.ndim != 4:
        raise InputError(f"forward_features returned shape {tuple(out.shape)}; expected a feature map")
    features = getattr(model, "num_features", None)
    if out.shape[1] != features and out.shape[-1] == features:  # NHWC backbones (Swin, …)
        out = out.permute(0, 3, 1, 2)
    return out


@torch.no_grad()
def mosaic_features(model: nn.Module, dataset: Any, n_mosaics: int, seed: int, *, size: int, mean: Sequence[float],
                    std: Sequence[float], crop_pct: float, batch_size: int, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C, h, w) frozen feature maps of the split's mosaics and their (M, 4) quadrant classes."""
    indices = mosaic_indices(len(dataset), n_mosaics, seed)
    views = centre_views(dataset, indices, size, crop_pct)
    labels = torch.tensor(dataset.labels, dtype=torch.int64)[indices]
    maps = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n_mosaics, batch_size):
            chunk = indices[start:start + batch_size]
            quadrants = torch.stack([torch.stack([views[int(i)] for i in row]) for row in chunk])
            images = normalize(tile(quadrants).to(device), tuple(mean), tuple(std))
            maps.append(feature_map(model, images).float().cpu())
    finally:
        model.train(was_training)
    result = torch.cat(maps)
    if not torch.isfinite(result).all():
        raise InputError("the model produced non-finite feature maps (NaN/inf)")
    return result, labels


# --- probe -------------------------------------------------------------------------------------

def _cells(maps: torch.Tensor) -> torch.Tensor:
    """(M, C, h, w) → (M·h·w, C), rows in (mosaic, row, column) order."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def segmentation_scores(predicted: torch.Tensor, truth: torch.Tensor, num_classes: int) -> tuple[float, float, list]:
    """Pixel accuracy, mIoU (percent) and per-class IoU (None where a class is in neither map)."""
    confusion = torch.bincount(truth.flatten() * num_classes + predicted.flatten(),
                               minlength=num_classes * num_classes).view(num_classes, num_classes).double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    per_class = [float(100.0 * i / u) if u > 0 else None for i, u in zip(intersection.tolist(), union.tolist())]
    present = [value for value in per_class if value is not None]
    pixel_accuracy = float(100.0 * intersection.sum() / confusion.sum())
    return pixel_accuracy, sum(present) / len(present), per_class


def predict_pixels(maps: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                   inv_std: torch.Tensor, out_size: int) -> torch.Tensor:
    """Per-pixel classes: the 1×1 classifier on standardised maps, logits upsampled bilinearly to ``out_size``."""
    standardised = (maps - mean[None, :, None, None]) * inv_std[None, :, None, None]
    logits = torch.einsum("mchw,ck->mkhw", standardised, weight) + bias[None, :, None, None]
    logits = F.interpolate(logits, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


def dense_probe_maps(train_maps: torch.Tensor, train_quadrants: torch.Tensor, val_maps: torch.Tensor,
                     val_quadrants: torch.Tensor, num_classes: int, image_size: int,
                     config: DenseProbeConfig | None = None) -> DenseProbeResult:
    """Fit the probe on train mosaics' maps and score it on val mosaics (see the module docstring)."""
    config = config or DenseProbeConfig()
    if not config.lrs or not config.weight_decays or config.epochs < 1:
        raise InputError("dense probe needs at least one lr, one weight decay and epochs >= 1")
    grid = (int(train_maps.shape[-2]), int(train_maps.shape[-1]))
    n_train = train_maps.shape[0]
    n_held = max(1, int(round(config.heldout_fraction * n_train)))
    if n_held >= n_train:
        raise InputError(f"too few train mosaics ({n_train}) to hold out a selection split")
    train_cells, train_y = _cells(train_maps), cell_labels(train_quadrants, grid).flatten()
    per_mosaic = grid[0] * grid[1]
    fit_rows = (n_train - n_held) * per_mosaic  # the last mosaics are held out (whole mosaics, no leakage)
    settings = [(lr, wd) for lr in sorted(config.lrs) for wd in sorted(config.weight_decays)]
    lrs = torch.tensor([lr for lr, _ in settings], dtype=torch.float32)
    wds = torch.tensor([wd for _, wd in settings], dtype=torch.float32)
    sgd = LinearProbeConfig(lrs=config.lrs, weight_decays=config.weight_decays, epochs=config.epochs,
                            batch_size=config.batch_size, momentum=config.momentum, seed=config.seed)

    mean, inv_std = _standardiser(train_cells[:fit_rows])
    fit_x = (train_cells[:fit_rows] - mean) * inv_std
    held_x = (train_cells[fit_rows:] - mean) * inv_std
    weights, biases, diverged = train_linear(fit_x, train_y[:fit_rows], num_classes, lrs, wds, sgd)
    held_logits = torch.einsum("nd,gdc->gnc", held_x, weights) + biases[:, None, :]
    held_acc = 100.0 * (held_logits.argmax(dim=2) == train_y[fit_rows:][None]).float().mean(dim=1)
    held_acc = torch.where(diverged, torch.full_like(held_acc, -1.0), held_acc)
    if bool(diverged.all()):
        raise InputError("every dense-probe setting diverged", hint="lower the learning rates (--lrs)")
    best = int(torch.argmax(held_acc).item())
    sweep = [{"lr": lr, "weight_decay": wd, "heldout_cell_accuracy": None if bad else round(float(acc), 4),
              "diverged": bool(bad)} for (lr, wd), acc, bad in zip(settings, held_acc.tolist(), diverged.tolist())]

    mean, inv_std = _standardiser(train_cells)
    weights, biases, diverged = train_linear((train_cells - mean) * inv_std, train_y, num_classes,
                                             lrs[best:best + 1], wds[best:best + 1], sgd)
    if bool(diverged[0]):
        raise InputError("the dense probe diverged when retrained on all train mosaics", hint="lower --lrs")
    predicted = predict_pixels(val_maps, weights[0], biases[0], mean, inv_std, 2 * image_size)
    pixel_accuracy, miou, per_class = segmentation_scores(predicted, label_map(val_quadrants, image_size), num_classes)
    protocol = {
        "task": TASK, "mosaic": f"2x2 centre views of {image_size} px -> {2 * image_size} px",
        "train_mosaics": int(n_train), "val_mosaics": int(val_maps.shape[0]), "feature_grid": list(grid),
        "cell_label": "class of the quadrant holding the cell centre", "classifier": "1x1 linear, shared by all cells",
        "standardize": "train mean/var per channel", "optimizer": "sgd", "momentum": config.momentum,
        "schedule": "cosine", "init": "zeros", "epochs": config.epochs, "batch_size": config.batch_size,
        "lrs": sorted(config.lrs), "weight_decays": sorted(config.weight_decays),
        "selection": f"last {n_held} train mosaics held out, best cell accuracy, ties in grid order",
        "retrain": "all train mosaics", "upsample": "bilinear, align_corners=False, to mosaic pixels",
        "metrics": "pixel accuracy; mIoU over classes with a non-empty union", "seed": config.seed,
        "num_classes": int(num_classes), "dim": int(train_maps.shape[1]),
    }
    return DenseProbeResult(miou=round(miou, 4), pixel_accuracy=round(pixel_accuracy, 4), lr=settings[best][0],
                            weight_decay=settings[best][1], heldout_cell_accuracy=round(float(held_acc[best]), 4),
                            feature_grid=list(grid), per_class_iou=[None if v is None else round(v, 4) for v in per_class],
                            sweep=sweep, protocol=protocol)


def dense_probe(model: nn.Module, train_data: Any, val_data: Any, *, input_size: int, mean: Sequence[float],
                std: Sequence[float], crop_pct: float = 0.875, batch_size: int = 64,
                device: str | torch.device = "cpu", config: DenseProbeConfig | None = None) -> DenseProbeResult:
    """Build the mosaics of both splits, extract frozen maps, and run :func:`dense_probe_maps`."""
    config = config or DenseProbeConfig()
    device = torch.device(device)
    model = dense_model(model, 2 * int(input_size)).to(device)
    common = dict(size=int(input_size), mean=mean, std=std, crop_pct=crop_pct, batch_size=batch_size, device=device)
    train_maps, train_quadrants = mosaic_features(model, train_data, config.train_mosaics, config.seed, **common)
    val_maps, val_quadrants = mosaic_features(model, val_data, config.val_mosaics, config.seed + 1, **common)
    num_classes = len(getattr(train_data, "classes", []) or []) or int(max(train_quadrants.max(), val_quadrants.max())) + 1
    result = dense_probe_maps(train_maps, train_quadrants, val_maps, val_quadrants, num_classes, int(input_size), config)
    result.protocol["transform"] = {"view": "centre", "size": int(input_size), "crop_pct": float(crop_pct),
                                    "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    return result
