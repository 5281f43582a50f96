"""Replay-drift spot check: re-embed a few stored views with the live teacher and compare with the cache.

Hashes prove the shards are the bytes that were written; they cannot prove that today's decoder,
torchvision and teacher still produce those values. Re-running the teacher on a small random sample
of replayed views (export_cache_data.md §B.2: cosine >= 0.999) catches a changed JPEG decoder, resize
kernel or teacher build before a whole run trains on stale targets.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from distillctl.cache.store import FeatureCache
from distillctl.data.bad_images import BadImages, load_or_substitute
from distillctl.data.datasets import ImageDataset
from distillctl.data.views import normalize
from distillctl.errors import GateError, InputError
from distillctl.teachers.base import Teacher


def spot_check(cache: FeatureCache, teacher: Teacher, dataset: ImageDataset, *, samples: int = 64, seed: int = 0,
               device: str = "cpu", amp: str | None = None, min_cosine: float = 0.999) -> dict:
    """Cosine between cached and freshly computed outputs on ``samples`` random (image, view) pairs.

    Raises GateError (exit 3) when the teacher differs from the cache's or any cosine is below ``min_cosine``.
    ``amp`` defaults to the autocast mode the cache was built with.
    """
    if teacher.sha256 != cache.manifest["teacher"]["sha256"]:
        raise GateError(f"spot check: teacher sha256 {teacher.sha256[:12]}… is not the cache's "
                        f"{cache.manifest['teacher']['sha256'][:12]}…")
    if len(dataset) != cache.num_images:
        raise GateError(f"spot check: dataset has {len(dataset)} images, the cache {cache.num_images}")
    rng = np.random.default_rng(seed)
    count = min(samples, cache.num_images * cache.views)
    flat = rng.choice(cache.num_images * cache.views, size=count, replace=False)
    index, k = flat // cache.views, flat % cache.views
    # an unreadable image was cached from its keyed substitute (data/bad_images.py): replay on the same substitute
    bad = BadImages("cache check", len(dataset), max_fraction=1.0)
    images = []
    for i in index:
        _, image, unreadable = load_or_substitute(dataset, int(i))
        bad.add(unreadable)
        if image is None:
            raise InputError(f"spot check: image {int(i)} and its substitutes are unreadable; first: "
                             f"{unreadable[0][0]}: {unreadable[0][1]}")
        images.append(image)
    bad.report("substituted")
    pixels = torch.stack([cache.replay(image, int(i), int(v)) for image, i, v in zip(images, index, k)])
    torch_device = torch.device(device)
    teacher.to(torch_device)
    teacher.set_bn_mode("eval")
    amp = amp if amp is not None else cache.manifest.get("build", {}).get("amp", "none")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = torch.autocast(torch_device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        live = teacher.forward(normalize(pixels.to(torch_device), cache.mean, cache.std), set(cache.outputs),
                               taps=tuple(cache.taps))
    cached = cache.lookup(torch.from_numpy(index), torch.from_numpy(k), taps=tuple(cache.taps))
    result: dict = {"samples": int(count), "min_cosine": {}, "mean_cosine": {}, "threshold": min_cosine}
    worst: list[str] = []
    for name in (*cache.outputs, *cache.taps):  # a tap's map is compared as one flattened vector per view
        cosine = torch.nn.functional.cosine_similarity(live[name].float().cpu().flatten(1), cached[name].flatten(1),
                                                       dim=1)
        result["min_cosine"][name] = float(cosine.min())
        result["mean_cosine"][name] = float(cosine.mean())
        if float(cosine.min()) < min_cosine:
            row = int(cosine.argmin())
            worst.append(f"{name} cosine {float(cosine.min()):.5f} (image {int(index[row])}, view {int(k[row])})")
    if worst:
        raise GateError(f"feature cache at {cache.path} no longer matches the live teacher: " + "; ".join(worst)
                        + f" < {min_cosine}",
                        hint="the decoder, torchvision or teacher changed since the build; rebuild the cache")
    return result
