"""On-disk cache of evaluation embeddings: one ``.npy`` pair per (weights, data, transform).

The linear probe's sweep, a second ``eval`` call and the INT8 accuracy gate reuse embeddings instead
of re-running the encoder. Entries are keyed by a hash of exactly what determines them, so a changed
checkpoint, dataset or transform can never hit a stale entry; files are written atomically and the
JSON key file last (its presence means the entry is complete).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from distillctl._infra import atomic_path, atomic_write_text
from distillctl.eval.features import Encoder, embed_dataset, eval_transform


@dataclass
class EmbeddingCache:
    """Embeddings on disk so a second evaluation (or the linear-probe sweep) skips the forward passes.

    Key = sha256 of {encoder sha256, dataset manifest hash, transform + device type}; files ``<key>.emb.npy``,
    ``<key>.labels.npy`` and ``<key>.json`` (the key's inputs, written last: its presence means complete).
    """

    root: Path

    def key(self, encoder_sha256: str, data_manifest: str, transform: dict) -> str:
        blob = json.dumps({"encoder": encoder_sha256, "data": data_manifest, "transform": transform}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        meta = self.root / f"{key}.json"
        if not meta.is_file():
            return None
        try:
            emb = np.load(self.root / f"{key}.emb.npy", allow_pickle=False)
            labels = np.load(self.root / f"{key}.labels.npy", allow_pickle=False)
        except (OSError, ValueError):
            return None
        if emb.ndim != 2 or labels.shape != (emb.shape[0],):
            return None
        return torch.from_numpy(emb.astype(np.float32, copy=False)), torch.from_numpy(labels.astype(np.int64, copy=False))

    def save(self, key: str, embeddings: torch.Tensor, labels: torch.Tensor, info: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_npy(self.root / f"{key}.emb.npy", embeddings.numpy())
        _atomic_npy(self.root / f"{key}.labels.npy", labels.numpy())
        atomic_write_text(self.root / f"{key}.json", json.dumps(info, indent=2, sort_keys=True))


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)



def embed_dataset_cached(
    encoder: Encoder | nn.Module,
    dataset: Any,
    *,
    cache: EmbeddingCache | None,
    encoder_sha256: str | None,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 0.875,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """:func:`embed_dataset` through ``cache`` (if given); returns (embeddings, labels, cache_hit)."""
    kwargs = dict(input_size=input_size, mean=mean, std=std, crop_pct=crop_pct)
    if cache is None or encoder_sha256 is None:
        emb, labels = embed_dataset(encoder, dataset, batch_size=batch_size, device=device, num_workers=num_workers, **kwargs)
        return emb, labels, False
    # The device type is part of the key: CPU and GPU kernels (and ONNX execution providers) differ in
    # the last bits, and an artefact's accuracy must come from the runtime it is evaluated on.
    transform = {**eval_transform(input_size, mean, std, crop_pct), "device": torch.device(device).type}
    manifest = dataset.manifest_hash()
    key = cache.key(encoder_sha256, manifest, transform)
    hit = cache.load(key)
    if hit is not None:
        return hit[0], hit[1], True
    emb, labels = embed_dataset(encoder, dataset, batch_size=batch_size, device=device, num_workers=num_workers, **kwargs)
    cache.save(key, emb, labels, {"encoder_sha256": encoder_sha256, "data_manifest": manifest,
                                  "dataset": getattr(dataset, "name", ""), "transform": transform,
                                  "shape": list(emb.shape)})
    return emb, labels, False
