"""Offline artefacts derived from a feature cache's centre-crop (view 0) embeddings.

- :func:`knn_bags`: each image's k nearest neighbours by cosine similarity, self excluded (BINGO's bags).
- :func:`kmeans_labels`: spherical k-means cluster labels (cluster-transfer pseudo-labels, Noroozi et al.).

Both work in blocks: the centre embeddings stay in their fp16 form (N x D x 2 bytes) and only a
``block x block`` similarity tile is ever materialised, never N x N. Results are written beside the
cache (``<cache>/artifacts/``) with a small JSON manifest and reused when the cache fingerprint and
parameters match and the file hash checks out.
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from distillctl.cache import layout
from distillctl.cache.store import FeatureCache
from distillctl.errors import UsageError
from distillctl.eval.knn import nearest_neighbours


def _centre_matrix(cache: FeatureCache, output: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) fp16 view-0 embeddings and their (N,) float32 inverse norms, read shard-block by block."""
    if output not in cache.outputs:
        raise UsageError(f"cache at {cache.path} has no '{output}' outputs (has {', '.join(cache.outputs)})")
    n = cache.num_images
    raw = torch.empty((n, cache.outputs[output]), dtype=torch.float16)
    inverse_norm = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, block):
        index = torch.arange(start, min(n, start + block))
        values = cache.lookup(index, torch.zeros_like(index))[output]
        raw[start:start + len(index)] = values.half()
        inverse_norm[start:start + len(index)] = 1.0 / values.norm(dim=1).clamp_min(1e-12)
    return raw, inverse_norm


def _unit_block(raw: torch.Tensor, inverse_norm: torch.Tensor, start: int, stop: int, device: torch.device) -> torch.Tensor:
    return (raw[start:stop].float() * inverse_norm[start:stop, None]).to(device)


def _artifact_paths(cache: FeatureCache, stem: str) -> tuple[Path, Path]:
    folder = cache.path / "artifacts"
    return folder / f"{stem}.npy", folder / f"{stem}.json"


def _load_matching(cache: FeatureCache, stem: str, params: dict) -> np.ndarray | None:
    array_path, meta_path = _artifact_paths(cache, stem)
    if not (array_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = layout.read_json(meta_path)
    except (OSError, ValueError):
        return None
    if meta.get("cache_fingerprint") != cache.fingerprint or meta.get("params") != params:
        return None
    if layout.sha256_file(array_path) != meta.get("sha256"):
        return None
    return np.load(array_path)


def _save(cache: FeatureCache, stem: str, kind: str, params: dict, array: np.ndarray, extra: dict | None = None) -> None:
    """Array first, then its manifest (atomic each): a manifest always describes a complete array."""
    array_path, meta_path = _artifact_paths(cache, stem)
    buffer = io.BytesIO()
    np.save(buffer, array)
    layout.atomic_write_bytes(array_path, buffer.getvalue())
    meta = {"kind": kind, "cache_fingerprint": cache.fingerprint, "params": params, "shape": list(array.shape),
            "dtype": str(array.dtype), "sha256": layout.sha256_file(array_path),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(extra or {})}
    layout.atomic_write_json(meta_path, meta)


def knn_bags(cache: FeatureCache, k: int = 5, output: str = "pooled", block: int = 4096, *, device: str = "cpu",
             reuse: bool = True) -> np.ndarray:
    """(N, k) int64: indices of each image's k most cosine-similar other images, most similar first."""
    n = cache.num_images
    if not 1 <= k < n:  # before the cache is read
        raise UsageError(f"kNN bags need 1 <= k < number of images ({n}); got k={k}")
    params = {"k": k, "output": output, "view": 0, "metric": "cosine", "exclude_self": True}
    stem = f"knn_{output}_k{k}"
    if reuse and (found := _load_matching(cache, stem, params)) is not None:
        return found
    raw, inverse_norm = _centre_matrix(cache, output, block)
    torch_device = torch.device(device)
    bags = nearest_neighbours(lambda start, stop: _unit_block(raw, inverse_norm, start, stop, torch_device), n, k,
                              block).numpy()
    _save(cache, stem, "knn_bags", params, bags)
    return bags


def _assign(raw: torch.Tensor, inverse_norm: torch.Tensor, centroids: torch.Tensor, block: int,
            device: torch.device, sums: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (max cosine) of every image; optionally accumulates per-cluster sums of unit vectors."""
    n = raw.shape[0]
    labels = torch.empty(n, dtype=torch.int64)
    similarity = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        units = _unit_block(raw, inverse_norm, start, stop, device)
        best, label = (units @ centroids.T).max(dim=1)
        labels[start:stop] = label.cpu()
        similarity[start:stop] = best.cpu()
        if sums is not None:
            sums.index_add_(0, label, units)
    return labels, similarity


def kmeans_labels(cache: FeatureCache, clusters: int, iters: int = 20, seed: int = 0, *, output: str = "pooled",
                  block: int = 4096, device: str = "cpu", reuse: bool = True) -> np.ndarray:
    """(N,) int64 spherical k-means labels of the centre embeddings; deterministic for a seed (on CPU).

    Initial centroids are ``clusters`` distinct images drawn with ``numpy.random.default_rng(seed)``;
    an emptied cluster is re-seeded with the image farthest from its centroid.
    """
    n = cache.num_images
    if not 1 <= clusters <= n:
        raise UsageError(f"k-means needs 1 <= clusters <= number of images ({n}); got {clusters}")
    if iters < 1:
        raise UsageError(f"k-means needs iters >= 1; got {iters}")
    params = {"clusters": clusters, "iters": iters, "seed": seed, "output": output, "view": 0, "metric": "cosine"}
    stem = f"kmeans_{output}_c{clusters}_s{seed}"
    if reuse and (found := _load_matching(cache, stem, params)) is not None:
        return found
    raw, inverse_norm = _centre_matrix(cache, output, block)
    torch_device = torch.device(device)
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=clusters, replace=False))
    centroids = (raw[chosen].float() * inverse_norm[chosen, None]).to(torch_device)
    previous: torch.Tensor | None = None
    iterations = 0
    for _ in range(iters):
        iterations += 1
        sums = torch.zeros_like(centroids)
        labels, similarity = _assign(raw, inverse_norm, centroids, block, torch_device, sums)
        if previous is not None and torch.equal(labels, previous):
            break
        previous = labels
        norms = sums.norm(dim=1)
        empty = torch.nonzero(norms <= 1e-12).flatten().cpu()
        centroids = sums / norms.clamp_min(1e-12)[:, None]
        if len(empty):
            farthest = torch.argsort(similarity, stable=True)[: len(empty)]
            centroids[empty.to(torch_device)] = _unit_rows(raw, inverse_norm, farthest).to(torch_device)
    labels, similarity = _assign(raw, inverse_norm, centroids, block, torch_device)
    result = labels.numpy().astype(np.int64)
    centroid_path = _artifact_paths(cache, stem)[0].with_name(f"{stem}.centroids.npy")
    buffer = io.BytesIO()
    np.save(buffer, centroids.cpu().numpy().astype(np.float32))
    layout.atomic_write_bytes(centroid_path, buffer.getvalue())
    _save(cache, stem, "kmeans_labels", params, result,
          extra={"iterations": iterations, "mean_cosine": float(similarity.mean()), "centroids": centroid_path.name})
    return result


def _unit_rows(raw: torch.Tensor, inverse_norm: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return raw[rows].float() * inverse_norm[rows, None]
