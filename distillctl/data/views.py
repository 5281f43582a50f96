"""Augmented views from explicit, stored parameters.

Every view is ``sample_view(spec, H, W, rng) -> ViewParams`` followed by
``apply_view(image_uint8, params, spec, mean, std)``. Parameters are integers (the crop box in
pixels of the decoded image) and a few floats, never seeds: the feature cache stores them and replays
the exact pixels the teacher saw (torchvision's own random transforms draw from the global RNG in an
implementation-defined order, and normalised float boxes can be off by a pixel).

Per-sample randomness comes from ``sample_rng(seed, epoch, index, slot)`` (numpy Philox keyed by
those four integers), so a sample's views do not depend on worker count, batch position, world size
or whether the run was resumed: that is what makes resume exact and DDP runs comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

# Augmentation families (MoCo v2 / SimCLR / BYOL settings from the papers).
FAMILIES = ("centre", "weak", "mocov2", "simclr", "byol1", "byol2", "ssl-small")


@dataclass(frozen=True)
class ViewSpec:
    """What one view is: output size, crop scale and the photometric family."""

    size: int = 224
    family: str = "weak"
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    crop_pct: float = 0.875  # centre views: side of the box relative to the short side
    quarter_turns: int = 0  # rotate the finished view by k·90° counter-clockwise (np.rot90; DLKD's rotation copies)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown view family {self.family!r}; valid: {', '.join(FAMILIES)}")
        if self.quarter_turns not in (0, 1, 2, 3):
            raise ValueError(f"quarter_turns must be 0, 1, 2 or 3, got {self.quarter_turns}")


@dataclass(frozen=True)
class Photometric:
    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


PHOTOMETRIC: dict[str, Photometric] = {
    "centre": Photometric(),
    "weak": Photometric(),
    # MoCo v2: ColorJitter(0.4,0.4,0.4,0.1) p=0.8, grayscale 0.2, blur p=0.5 sigma 0.1-2.
    "mocov2": Photometric(0.8, 0.4, 0.4, 0.4, 0.1, 0.2, 0.5),
    # SimCLR: strength-1 jitter (0.8,0.8,0.8,0.2) p=0.8, grayscale 0.2, blur p=0.5.
    "simclr": Photometric(0.8, 0.8, 0.8, 0.8, 0.2, 0.2, 0.5),
    # BYOL's asymmetric pair: blur 1.0 / 0.1, solarize 0 / 0.2, jitter (0.4,0.4,0.2,0.1).
    "byol1": Photometric(0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 1.0, (0.1, 2.0), 0.0),
    "byol2": Photometric(0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 0.1, (0.1, 2.0), 0.2),
    # ssl-small (Shi et al., --cj 1): ColorJitter(0.8, 0.8, 0.8, 0.4) p=0.8, grayscale p=0.5, blur p=0.5.
    "ssl-small": Photometric(0.8, 0.8, 0.8, 0.8, 0.4, 0.5, 0.5),
}


@dataclass
class ViewParams:
    """Everything needed to replay one view exactly (a 52-byte row in the cache's structured dtype)."""

    top: int
    left: int
    height: int
    width: int
    src_height: int
    src_width: int
    flip: bool = False
    jitter: bool = False
    order: tuple[int, int, int, int] = (0, 1, 2, 3)
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    gray: bool = False
    blur_sigma: float = 0.0  # 0 = not applied
    solarize: bool = False


# Structured dtype used by the feature cache to store ViewParams (fixed 52-byte rows).
PARAMS_DTYPE = np.dtype(
    [
        ("top", "<i4"), ("left", "<i4"), ("height", "<i4"), ("width", "<i4"),
        ("src_height", "<i4"), ("src_width", "<i4"),
        ("brightness", "<f4"), ("contrast", "<f4"), ("saturation", "<f4"), ("hue", "<f4"),
        ("blur_sigma", "<f4"), ("order", "u1", (4,)), ("flags", "u1"), ("_pad", "u1", (3,)),
    ]
)
_FLAG_BITS = {"flip": 1, "jitter": 2, "gray": 4, "solarize": 8}


def params_to_record(params: ViewParams) -> np.void:
    record = np.zeros((), dtype=PARAMS_DTYPE)
    for name in ("top", "left", "height", "width", "src_height", "src_width", "brightness", "contrast",
                 "saturation", "hue", "blur_sigma"):
        record[name] = getattr(params, name)
    record["order"] = np.asarray(params.order, dtype=np.uint8)
    record["flags"] = sum(bit for name, bit in _FLAG_BITS.items() if getattr(params, name))
    return record


def record_to_params(record: np.void) -> ViewParams:
    flags = int(record["flags"])
    values = {name: record[name].item() for name in ("top", "left", "height", "width", "src_height", "src_width")}
    floats = {name: float(record[name]) for name in ("brightness", "contrast", "saturation", "hue", "blur_sigma")}
    return ViewParams(
        **values,
        **floats,
        order=tuple(int(v) for v in record["order"]),
        **{name: bool(flags & bit) for name, bit in _FLAG_BITS.items()},
    )


def sample_rng(seed: int, epoch: int, index: int, slot: int) -> np.random.Generator:
    """An independent generator per (run seed, epoch, image, view slot)."""
    return np.random.Generator(np.random.Philox(key=[(seed & 0xFFFFFFFF) | ((epoch & 0xFFFFFFFF) << 32),
                                                     (index & 0xFFFFFFFF) | ((slot & 0xFFFFFFFF) << 32)]))


NEIGHBOUR_SLOT = 1_000  # view-RNG slot that draws a sample's neighbour (apart from the per-view slots 0, 1, …)


def draw_neighbour(bags, index: int, seed: int, epoch: int) -> int:
    """The bag member sample ``index`` shows this epoch: uniform over its bag, keyed by (seed, epoch, index),
    so it does not depend on batch layout, workers, world size or resume (the trainer and BINGO share it)."""
    row = bags[index]
    return int(row[int(sample_rng(seed, epoch, index, NEIGHBOUR_SLOT).integers(len(row)))])


def centre_box(spec: ViewSpec, height: int, width: int) -> tuple[int, int, int, int]:
    side = max(1, int(round(min(height, width) * spec.crop_pct)))
    top = (height - side) // 2
    left = (width - side) // 2
    return top, left, side, side


def random_resized_box(spec: ViewSpec, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Inception-style crop: area fraction in ``scale``, log-uniform aspect ratio, 10 tries then centre."""
    area = height * width
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    # Fallback: the largest centred crop with a clamped ratio.
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        crop_w, crop_h = width, int(round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        crop_h, crop_w = height, int(round(height * spec.ratio[1]))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _f32(value: float) -> float:
    """Round to float32 at sampling time so stored and live parameters are identical."""
    return float(np.float32(value))


def sample_view(spec: ViewSpec, height: int, width: int, rng: np.random.Generator | None) -> ViewParams:
    """Draw the parameters of one view of an image of size (height, width)."""
    if spec.family == "centre" or rng is None:
        top, left, box_h, box_w = centre_box(spec, height, width)
        return ViewParams(top, left, box_h, box_w, height, width)
    top, left, box_h, box_w = random_resized_box(spec, height, width, rng)
    params = ViewParams(top, left, box_h, box_w, height, width)
    params.flip = bool(spec.flip and rng.random() < 0.5)
    photo = PHOTOMETRIC[spec.family]
    if photo.jitter_p > 0 and rng.random() < photo.jitter_p:
        params.jitter = True
        params.order = tuple(int(v) for v in rng.permutation(4))
        params.brightness = _f32(rng.uniform(max(0.0, 1 - photo.brightness), 1 + photo.brightness))
        params.contrast = _f32(rng.uniform(max(0.0, 1 - photo.contrast), 1 + photo.contrast))
        params.saturation = _f32(rng.uniform(max(0.0, 1 - photo.saturation), 1 + photo.saturation))
        params.hue = _f32(rng.uniform(-photo.hue, photo.hue))
    params.gray = bool(photo.gray_p > 0 and rng.random() < photo.gray_p)
    if photo.blur_p > 0 and rng.random() < photo.blur_p:
        params.blur_sigma = _f32(rng.uniform(*photo.blur_sigma))
    params.solarize = bool(photo.solarize_p > 0 and rng.random() < photo.solarize_p)
    return params


def _blur_kernel(size: int) -> int:
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # ~10% of the view, odd (SimCLR's choice)
    return kernel


def apply_view_uint8(image: torch.Tensor, params: ViewParams, spec: ViewSpec) -> torch.Tensor:
    """Replay a view on a uint8 (3,H,W) image; returns uint8 (3,size,size). Deterministic on CPU."""
    if (image.shape[-2], image.shape[-1]) != (params.src_height, params.src_width):
        raise ValueError(
            f"view was sampled for a {params.src_height}x{params.src_width} image but got "
            f"{image.shape[-2]}x{image.shape[-1]} (did the data change?)"
        )
    view = F.resized_crop(image, params.top, params.left, params.height, params.width, [spec.size, spec.size],
                          interpolation=InterpolationMode.BILINEAR, antialias=True)
    if params.flip:
        view = F.horizontal_flip(view)
    if params.jitter:
        for op in params.order:
            if op == 0:
                view = F.adjust_brightness(view, params.brightness)
            elif op == 1:
                view = F.adjust_contrast(view, params.contrast)
            elif op == 2:
                view = F.adjust_saturation(view, params.saturation)
            else:
                view = F.adjust_hue(view, params.hue)
    if params.gray:
        view = F.rgb_to_grayscale(view, num_output_channels=3)
    if params.blur_sigma > 0:
        kernel = _blur_kernel(spec.size)
        view = F.gaussian_blur(view, [kernel, kernel], [params.blur_sigma, params.blur_sigma])
    if params.solarize:
        view = F.solarize(view, threshold=128)
    if spec.quarter_turns:
        view = torch.rot90(view, spec.quarter_turns, dims=(-2, -1))
    return view


def normalize(views_uint8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (...,3,H,W) → float32 normalised. Done per batch (on the GPU when there is one)."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=views_uint8.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=views_uint8.device).view(3, 1, 1)
    return (views_uint8.float() / 255.0 - mean_t) / std_t


def spec_dict(spec: ViewSpec) -> dict:
    """The spec's fields; ``quarter_turns`` only when set, so unrotated specs keep their manifest form."""
    return {f.name: getattr(spec, f.name) for f in fields(spec) if f.name != "quarter_turns" or spec.quarter_turns}
