"""Offline artefacts: kNN bags against a brute-force loop, seeded k-means against a loop-based Lloyd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_helpers import MEAN, STD, LinearBackbone
from distillctl.cache import FeatureCache, build_cache, kmeans_labels, knn_bags
from distillctl.cache import artifacts
from distillctl.data.views import ViewSpec
from distillctl.errors import UsageError
from distillctl.teachers.base import Teacher

SIZE = 16


@pytest.fixture(scope="module")
def cache(digits, tmp_path_factory) -> FeatureCache:
    teacher = Teacher(name="linear", arch="linear", backbone=LinearBackbone(SIZE), embed_dim=24, sha256="ef" * 32)
    out = tmp_path_factory.mktemp("artifacts") / "cache"
    return build_cache(teacher, digits, out, spec=ViewSpec(size=SIZE, family="weak"), views=2, outputs={"pooled"},
                       mean=MEAN, std=STD, batch_size=20, shard_size=15, progress=False)


def _centre(cache: FeatureCache) -> np.ndarray:
    """View-0 embeddings, read row by row through the public lookup, in float64."""
    rows = [cache.lookup(torch.tensor([i]), torch.tensor([0]))["pooled"][0].double().numpy() for i in range(cache.num_images)]
    return np.stack(rows)


def test_knn_bags_match_a_brute_force_loop(cache):
    bags = knn_bags(cache, k=5, block=7, reuse=False)  # 7 does not divide 48: ragged blocks, self on block edges
    assert bags.shape == (48, 5) and bags.dtype == np.int64
    features = _centre(cache)
    for i in range(cache.num_images):
        similarities = []
        for j in range(cache.num_images):
            if j != i:
                cosine = features[i] @ features[j] / (np.linalg.norm(features[i]) * np.linalg.norm(features[j]))
                similarities.append((cosine, j))
        similarities.sort(key=lambda pair: -pair[0])
        expected = [j for _, j in similarities[:5]]
        expected_sims = [s for s, _ in similarities[:5]]
        assert i not in bags[i] and len(set(bags[i])) == 5
        got_sims = [features[i] @ features[j] / (np.linalg.norm(features[i]) * np.linalg.norm(features[j])) for j in bags[i]]
        np.testing.assert_allclose(got_sims, expected_sims, atol=1e-5)  # same neighbours up to exact ties
        if min(abs(a - b) for a, b in zip(expected_sims[:-1], expected_sims[1:])) > 1e-5:
            assert list(bags[i]) == expected
    # the block size changes only the tiling, not the answer
    assert np.array_equal(knn_bags(cache, k=5, block=4096, reuse=False), bags)


def test_knn_bags_are_stored_and_reused_only_when_matching(cache, monkeypatch):
    first = knn_bags(cache, k=3, block=16)
    npy = cache.path / "artifacts" / "knn_pooled_k3.npy"
    meta = cache.path / "artifacts" / "knn_pooled_k3.json"
    assert npy.is_file() and meta.is_file()
    calls = {"n": 0}
    real = artifacts._centre_matrix

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(artifacts, "_centre_matrix", counting)
    assert np.array_equal(knn_bags(cache, k=3, block=16), first) and calls["n"] == 0  # read back from disk
    npy.write_bytes(npy.read_bytes()[:-8] + b"\x00" * 8)  # tampered: hash no longer matches → recomputed
    assert np.array_equal(knn_bags(cache, k=3, block=16), first) and calls["n"] == 1
    knn_bags(cache, k=4, block=16)  # other parameters → its own artefact
    assert calls["n"] == 2 and (cache.path / "artifacts" / "knn_pooled_k4.npy").is_file()


def _lloyd(features: np.ndarray, clusters: int, iters: int, seed: int) -> np.ndarray:
    """Plain spherical k-means, loop by loop, with the documented initialisation and re-seeding rules."""
    units = features / np.linalg.norm(features, axis=1, keepdims=True)
    centroids = units[np.sort(np.random.default_rng(seed).choice(len(units), size=clusters, replace=False))]
    previous = None
    for _ in range(iters):
        labels = np.array([int(np.argmax([u @ c for c in centroids])) for u in units])
        best = np.array([max(u @ c for c in centroids) for u in units])
        if previous is not None and np.array_equal(labels, previous):
            break
        previous = labels
        sums = np.zeros_like(centroids)
        for u, label in zip(units, labels):
            sums[label] += u
        norms = np.linalg.norm(sums, axis=1)
        empty = np.flatnonzero(norms <= 1e-12)
        centroids = sums / np.maximum(norms, 1e-12)[:, None]
        for slot, row in zip(empty, np.argsort(best, kind="stable")[: len(empty)]):
            centroids[slot] = units[row]
    return np.array([int(np.argmax([u @ c for c in centroids])) for u in units])


def test_kmeans_is_deterministic_and_matches_a_loop_reference(cache):
    labels = kmeans_labels(cache, clusters=4, iters=15, seed=3, block=10, reuse=False)
    again = kmeans_labels(cache, clusters=4, iters=15, seed=3, block=48, reuse=False)
    assert labels.shape == (48,) and labels.dtype == np.int64
    assert np.array_equal(labels, again)
    assert set(labels.tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(labels, _lloyd(_centre(cache), 4, 15, 3))
    other_seed = kmeans_labels(cache, clusters=4, iters=15, seed=4, reuse=False)
    assert np.array_equal(other_seed, _lloyd(_centre(cache), 4, 15, 4))
    meta = artifacts._artifact_paths(cache, "kmeans_pooled_c4_s3")[1]
    assert meta.is_file() and (cache.path / "artifacts" / "kmeans_pooled_c4_s3.centroids.npy").is_file()


def test_artifact_arguments_are_checked(cache):
    with pytest.raises(UsageError, match="k < number of images"):
        knn_bags(cache, k=48)
    with pytest.raises(UsageError, match="no 'proj' outputs"):
        knn_bags(cache, k=2, output="proj")
    with pytest.raises(UsageError, match="clusters <="):
        kmeans_labels(cache, clusters=49, iters=2, seed=0)
