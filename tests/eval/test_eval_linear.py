"""Linear probe: beats chance on built-in digits, reproducible, batched sweep = independent runs, divergence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillctl.data.datasets import open_dataset
from distillctl.errors import InputError
from distillctl.eval.features import embed_dataset
from distillctl.eval.linear import (
    LinearProbeConfig,
    linear_probe,
    linear_probe_embeddings,
    stratified_holdout,
    train_linear,
)


@pytest.fixture(scope="module")
def digit_embeddings():
    """Embeddings of builtin:digits by a randomly initialised tiny CNN (timm test_resnet, 32 px)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=0, pretrained=False)
    pre = {"input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    train = embed_dataset(model, open_dataset("builtin:digits", "train"), **pre)
    val = embed_dataset(model, open_dataset("builtin:digits", "test"), **pre)
    return train, val


def test_probe_beats_chance_and_is_reproducible(digit_embeddings):
    (train_x, train_y), (val_x, val_y) = digit_embeddings
    config = LinearProbeConfig(epochs=20, seed=3)
    first = linear_probe_embeddings(train_x, train_y, val_x, val_y, config)
    second = linear_probe_embeddings(train_x, train_y, val_x, val_y, config)
    assert first.top1 > 50.0  # chance is 10 %
    assert first.to_dict() == second.to_dict()
    assert (first.lr, first.weight_decay) in {(r["lr"], r["weight_decay"]) for r in first.sweep}
    assert len(first.sweep) == len(config.lrs) * len(config.weight_decays)
    best_heldout = max(r["heldout_top1"] for r in first.sweep)
    assert first.heldout_top1 == best_heldout
    protocol = first.protocol
    assert protocol["n_train"] == 1437 and protocol["n_val"] == 360 and protocol["num_classes"] == 10
    assert protocol["n_heldout"] == pytest.approx(144, abs=5) and protocol["seed"] == 3
    # A different seed gives a different held-out split (and in general different numbers).
    other = linear_probe_embeddings(train_x, train_y, val_x, val_y, LinearProbeConfig(epochs=20, seed=4))
    assert other.sweep != first.sweep


def test_batched_sweep_equals_independent_runs():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(90, 6, generator=gen), torch.randint(0, 3, (90,), generator=gen)
    config = LinearProbeConfig(epochs=4, batch_size=16)
    lrs, wds = torch.tensor([0.05, 0.5, 0.5]), torch.tensor([0.0, 0.0, 0.1])
    weights, biases, diverged = train_linear(x, y, 3, lrs, wds, config)
    assert not diverged.any()
    for g in range(3):
        w1, b1, _ = train_linear(x, y, 3, lrs[g : g + 1], wds[g : g + 1], config)
        torch.testing.assert_close(weights[g], w1[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(biases[g], b1[0], rtol=1e-5, atol=1e-6)
    # Weight decay shrinks the weights of the otherwise identical setting.
    assert weights[2].norm() < weights[1].norm()


def test_reference_sgd_step_by_hand():
    """One plain-loop SGD step (momentum buffer starts at the gradient) on a 2-sample problem."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    config = LinearProbeConfig(epochs=1, batch_size=2)
    weights, biases, _ = train_linear(x, y, 2, torch.tensor([0.5]), torch.tensor([0.0]), config)
    # At zero init softmax is uniform: dL/dW[d,c] = mean_n x[n,d] (0.5 - onehot[n,c]); step = 0.5 * grad.
    grad = torch.zeros(2, 2)
    for n in range(2):
        for d in range(2):
            for c in range(2):
                grad[d, c] += x[n, d] * (0.5 - float(y[n] == c)) / 2
    torch.testing.assert_close(weights[0], -0.5 * grad)
    torch.testing.assert_close(biases[0], torch.zeros(2))


def test_divergent_setting_is_reported_not_chosen():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=gen) * 4
    y = torch.arange(3).repeat(30)
    x = centres[y] + torch.randn(90, 8, generator=gen)
    result = linear_probe_embeddings(x, y, x, y, LinearProbeConfig(lrs=(0.1, 1e38), weight_decays=(0.0,), epochs=5))
    rows = {r["lr"]: r for r in result.sweep}
    assert rows[1e38]["diverged"] and rows[1e38]["heldout_top1"] is None
    assert not rows[0.1]["diverged"] and result.lr == 0.1 and result.top1 > 90.0
    with pytest.raises(InputError, match="diverged"):
        linear_probe_embeddings(x, y, x, y, LinearProbeConfig(lrs=(1e38,), weight_decays=(0.0,), epochs=5))


def test_stratified_holdout_is_seeded_and_per_class():
    labels = np.repeat(np.arange(4), [10, 20, 30, 2])
    fit, held = stratified_holdout(labels, 0.1, seed=0)
    assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == len(labels)
    assert np.bincount(labels[held], minlength=4).tolist() == [1, 2, 3, 1]
    again_fit, again_held = stratified_holdout(labels, 0.1, seed=0)
    assert np.array_equal(held, again_held) and np.array_equal(fit, again_fit)
    assert not np.array_equal(held, stratified_holdout(labels, 0.1, seed=1)[1])


def test_encoder_level_probe_on_raw_pixels_with_cache(tmp_path):
    """The pipeline's call shape: encoder + datasets; features cached once and reused by a second probe."""
    from distillctl.eval.embedding_cache import EmbeddingCache

    train = open_dataset("builtin:digits", "train")
    val = open_dataset("builtin:digits", "test")
    pixels = torch.nn.Flatten()  # a raw-pixel encoder: 3x16x16 centre view → 768-d
    cache = EmbeddingCache(tmp_path)
    kwargs = dict(input_size=16, mean=[0.5] * 3, std=[0.25] * 3, crop_pct=1.0, seed=0,
                  config=LinearProbeConfig(epochs=10, lrs=(0.01, 0.1), weight_decays=(0.0, 1e-3)),
                  cache=cache, encoder_sha256="raw-pixels")
    first = linear_probe(pixels, train, val, **kwargs)
    assert len(list(tmp_path.glob("*.emb.npy"))) == 2  # train + val features written once
    second = linear_probe(lambda batch: pytest.fail("features should come from the cache"), train, val, **kwargs)
    assert first.top1 > 85.0 and first.to_dict() == second.to_dict()
    assert first.protocol["transform"]["size"] == 16 and first.protocol["epochs"] == 10
