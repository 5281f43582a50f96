"""Weighted k-nearest-neighbour classification of frozen embeddings (Wu et al. 2018; DINO's eval_knn).

For each test embedding: cosine similarity to every train embedding (both L2-normalised), the top-k
neighbours, each voting for its label with weight ``exp(sim / T)``; the class with the largest summed
weight is the prediction. All requested k share one ``topk(max(k))`` per chunk of test rows.

Conventions (documented because they change numbers at the margin):
- Ties between classes' vote totals go to the lowest class index (``argmax`` returns the first maximum).
- Neighbours with equal similarity at the k-th place are chosen by ``torch.topk`` (implementation order).
- ``k`` larger than the number of train embeddings is an error, not silently clamped, because a
  "kNN@200" that used 150 neighbours would be mislabelled in the results.
- Memory: one (chunk × N_train) similarity block at a time; ``chunk`` is lowered automatically so
  that block stays under ~1 GiB (2**28 floats).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from distillctl.errors import InputError, UsageError

_MAX_BLOCK_ELEMENTS = 1 << 28


@torch.no_grad()
def nearest_neighbours(unit_rows: Callable[[int, int], torch.Tensor], n: int, k: int, block: int = 4096) -> torch.Tensor:
    """(n, k) int64 on the CPU: for each row of an (n, D) matrix of unit vectors, the k other rows of largest cosine
    similarity (= smallest L2 distance), most similar first, the row itself excluded. The teacher-kNN bags of
    BINGO's stage 0, from the feature cache or from one online teacher pass alike.

    ``unit_rows(start, stop)`` returns rows ``[start, stop)`` (already normalised, on the device to compute on), so
    the matrix may live on disk: only two ``block``-row slices and a (block × block) similarity block are in memory.
    Exact (BINGO used faiss flat-L2); the running top-k of each query block is merged with every key block."""
    if not 1 <= k < n:
        raise UsageError(f"kNN bags need 1 <= k < number of images ({n}); got k={k}")
    bags = torch.empty((n, k), dtype=torch.int64)
    for q_start in range(0, n, block):
        queries = unit_rows(q_start, min(n, q_start + block))
        device, rows = queries.device, torch.arange(queries.shape[0], device=queries.device)
        best_sim = torch.full((len(rows), k), -torch.inf, device=device)
        best_idx = torch.full((len(rows), k), -1, dtype=torch.int64, device=device)
        for k_start in range(0, n, block):
            k_stop = min(n, k_start + block)
            sims = queries @ unit_rows(k_start, k_stop).T
            self_col = rows + q_start - k_start  # column of each query's own row in this key block
            inside = (self_col >= 0) & (self_col < k_stop - k_start)
            sims[rows[inside], self_col[inside]] = -torch.inf
            candidates = torch.arange(k_start, k_stop, device=device).expand(len(rows), -1)
            best_sim, position = torch.cat([best_sim, sims], dim=1).topk(k, dim=1)
            best_idx = torch.cat([best_idx, candidates], dim=1).gather(1, position)
        bags[q_start:q_start + len(rows)] = best_idx.cpu()
    return bags


def knn_protocol(ks: Iterable[int], temperature: float) -> dict:
    """The kNN protocol as plain data, written next to every kNN result."""
    return {"method": "weighted-knn", "similarity": "cosine", "ks": sorted(int(k) for k in ks),
            "temperature": float(temperature), "vote": "sum exp(sim/T) per class", "tie_break": "lowest class index"}


def knn_evaluate(
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    test_emb: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Iterable[int] = (20,),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
    device: str | torch.device | None = None,
) -> dict[int, float]:
    """Top-1 accuracy (percent) of weighted kNN for each k in ``ks``, in one pass over the test set."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InputError(f"k must be a positive integer, got {ks}")
    if temperature <= 0:
        raise InputError(f"kNN temperature must be > 0, got {temperature}")
    if train_emb.ndim != 2 or test_emb.ndim != 2 or train_emb.shape[1] != test_emb.shape[1]:
        raise InputError(f"embedding shapes do not match: train {tuple(train_emb.shape)}, test {tuple(test_emb.shape)}")
    if train_labels.shape != (train_emb.shape[0],) or test_labels.shape != (test_emb.shape[0],):
        raise InputError("each embedding needs exactly one label")
    n_train = train_emb.shape[0]
    if ks[-1] > n_train:
        raise InputError(f"k={ks[-1]} exceeds the {n_train} training embeddings",
                         hint=f"use k <= {n_train} (e.g. --k {min(20, n_train)})")
    if test_emb.shape[0] == 0:
        raise InputError("no test embeddings to evaluate")
    device = torch.device(device) if device is not None else train_emb.device
    train_labels = train_labels.to(device, torch.int64)
    test_labels = test_labels.to(device, torch.int64)
    top_label = int(max(train_labels.max().item(), test_labels.max().item()))
    if num_classes is None:
        num_classes = top_label + 1
    elif top_label >= num_classes:
        raise InputError(f"label {top_label} out of range for num_classes={num_classes}")
    if int(min(train_labels.min().item(), test_labels.min().item())) < 0:
        raise InputError("labels must be non-negative class indices")

    train_n = torch.nn.functional.normalize(train_emb.to(device, torch.float32), dim=1)
    k_max = ks[-1]
    chunk = max(1, min(int(chunk), _MAX_BLOCK_ELEMENTS // max(1, n_train)))
    correct = {k: 0 for k in ks}
    for start in range(0, test_emb.shape[0], chunk):
        queries = torch.nn.functional.normalize(test_emb[start : start + chunk].to(device, torch.float32), dim=1)
        similarity = queries @ train_n.T  # (chunk, N_train)
        top_sim, top_idx = similarity.topk(k_max, dim=1)  # sorted, largest first
        neighbour_labels = train_labels[top_idx]
        weights = (top_sim / temperature).exp()
        truth = test_labels[start : start + chunk]
        for k in ks:
            votes = torch.zeros(queries.shape[0], num_classes, device=device, dtype=torch.float32)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            correct[k] += int((votes.argmax(dim=1) == truth).sum().item())
    total = test_emb.shape[0]
    return {k: 100.0 * correct[k] / total for k in ks}
