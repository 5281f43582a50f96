"""embed_dataset (centre view + normalisation), encoders (PyTorch vs ONNX), load_encoder and the feature cache."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import MEAN, STD, copy_with_metadata

from distillctl.data.datasets import open_dataset
from distillctl.data.views import ViewSpec, apply_view_uint8, normalize, sample_view
from distillctl.errors import InputError, UsageError
from distillctl.eval.embedding_cache import EmbeddingCache, embed_dataset_cached
from distillctl.eval.features import OnnxEncoder, embed_dataset, encoder_fingerprint, load_encoder
from distillctl.eval.knn import knn_evaluate


@pytest.fixture(scope="module")
def digits():
    train = open_dataset("builtin:digits", "train")
    test = open_dataset("builtin:digits", "test")
    return train.subset(range(0, len(train), 4)), test.subset(range(0, len(test), 3))


class _Recorder(torch.nn.Module):
    """Flattens the batch (a 'raw pixel' encoder) and records the mode it was called in."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(3 * 16 * 16)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.bn(x.flatten(1))


def test_embed_dataset_applies_the_centre_view_and_eval_mode(digits):
    train, _ = digits
    module = _Recorder().train()
    emb, labels = embed_dataset(module, train, input_size=16, mean=MEAN, std=STD, crop_pct=0.75, batch_size=64)
    assert emb.dtype == torch.float32 and labels.dtype == torch.int64
    assert emb.shape == (len(train), 3 * 16 * 16)
    assert labels.tolist() == list(train.labels)
    assert module.modes and not any(module.modes)  # called in eval mode ...
    assert module.training  # ... and the caller's mode restored
    assert int(module.bn.num_batches_tracked) == 0  # BatchNorm statistics untouched
    # Independent computation of one sample: 24 px centre box of the 32 px image, resized to 16.
    spec = ViewSpec(size=16, family="centre", crop_pct=0.75)
    image = train.load_image(5)
    params = sample_view(spec, 32, 32, None)
    assert (params.top, params.left, params.height, params.width) == (4, 4, 24, 24)
    expected = normalize(apply_view_uint8(image, params, spec).unsqueeze(0), tuple(MEAN), tuple(STD)).flatten(1)
    expected = module.eval()(expected)
    torch.testing.assert_close(emb[5], expected[0], rtol=0, atol=1e-6)


def test_num_workers_and_batch_size_do_not_change_embeddings(digits):
    train, _ = digits
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    a, la = embed_dataset(module, train, input_size=20, mean=MEAN, std=STD, batch_size=256)
    b, lb = embed_dataset(module, train, input_size=20, mean=MEAN, std=STD, batch_size=7, num_workers=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(la, lb)


def test_onnx_artifact_gives_the_same_knn_accuracy_as_the_checkpoint(tiny_run, digits):
    run_dir, _, onnx_path = tiny_run
    train, test = digits
    results = {}
    for target in (run_dir, onnx_path):
        encoder, pre, description = load_encoder(target)
        # The ONNX file has no metadata: preprocessing comes from ../student/config.json.
        assert pre == {"input_size": 32, "mean": MEAN, "std": STD}, description
        tr, trl = embed_dataset(encoder, train, batch_size=64, **pre)
        te, tel = embed_dataset(encoder, test, batch_size=64, **pre)
        results[str(target)] = (tr, te, knn_evaluate(tr, trl, te, tel, ks=(1, 20)))
    (tr_pt, te_pt, acc_pt), (tr_onnx, te_onnx, acc_onnx) = results.values()
    assert isinstance(load_encoder(onnx_path)[0], OnnxEncoder)
    cosine = torch.nn.functional.cosine_similarity(tr_pt, tr_onnx, dim=1)
    assert cosine.min().item() > 0.99999
    assert acc_pt == acc_onnx
    assert acc_pt[20] > 20.0  # a random CNN on digits is far above the 10% chance level


def test_onnx_metadata_overrides_and_student_dir_target(tiny_run, tmp_path):
    run_dir, model, onnx_path = tiny_run
    meta = {"input_size": "32", "mean": json.dumps([0.1, 0.2, 0.3]), "std": json.dumps([1.0, 1.0, 1.0])}
    path = copy_with_metadata(onnx_path, tmp_path / "lonely.onnx", meta)
    encoder, pre, _ = load_encoder(path)
    assert pre == {"input_size": 32, "mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]} and encoder.crop_pct is None
    assert encoder(torch.zeros(3, 3, 32, 32)).shape == (3, model.num_features)
    # The keys distillctl's exporter writes (distillctl.input.*), crop included.
    card_meta = {"distillctl.input.size": "[32, 32]", "distillctl.input.mean": "[0.4, 0.4, 0.4]",
                 "distillctl.input.std": "[0.2, 0.2, 0.2]", "distillctl.input.crop_pct": "0.9"}
    encoder, pre, _ = load_encoder(copy_with_metadata(onnx_path, tmp_path / "carded.onnx", card_meta))
    assert pre == {"input_size": 32, "mean": [0.4] * 3, "std": [0.2] * 3} and encoder.crop_pct == 0.9
    _, pre_dir, description = load_encoder(run_dir / "student")
    assert pre_dir["input_size"] == 32 and "test_resnet" in description


def test_load_encoder_errors(tiny_run, tmp_path):
    _, _, onnx_path = tiny_run
    with pytest.raises(InputError, match="does not exist"):
        load_encoder(tmp_path / "nope")
    with pytest.raises(InputError, match="no student checkpoint"):
        load_encoder(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match="no loader"):
        load_encoder(tmp_path / "weights.bin")
    (tmp_path / "model.engine").write_bytes(b"x")
    # TensorRT engines are handled by distillctl.export.tensorrt (registered lazily); without the engine's
    # sidecar or without that module, the answer is a one-line exit-2 error either way.
    with pytest.raises((UsageError, InputError)) as info:
        load_encoder(tmp_path / "model.engine")
    assert info.value.exit_code == 2
    assert "engine" in f"{info.value.message} {info.value.hint}".lower()
    # An ONNX file without metadata and without a run layout around it cannot be normalised correctly.
    bare = copy_with_metadata(onnx_path, tmp_path / "bare" / "deep" / "m.onnx", {})
    with pytest.raises(InputError, match="no preprocessing metadata"):
        load_encoder(bare)


def test_feature_cache_reuses_embeddings(tiny_run, digits, tmp_path):
    run_dir, _, _ = tiny_run
    _, test = digits
    encoder, pre, _ = load_encoder(run_dir)
    cache = EmbeddingCache(tmp_path / "cache")
    sha = encoder_fingerprint(run_dir)
    first, labels, hit1 = embed_dataset_cached(encoder, test, cache=cache, encoder_sha256=sha, **pre)
    calls = []
    counting = lambda batch: calls.append(1) or encoder(batch)  # noqa: E731
    second, labels2, hit2 = embed_dataset_cached(counting, test, cache=cache, encoder_sha256=sha, **pre)
    assert (hit1, hit2) == (False, True) and not calls
    assert torch.equal(first, second) and torch.equal(labels, labels2)
    # A different transform is a different key.
    _, _, hit3 = embed_dataset_cached(encoder, test, cache=cache, encoder_sha256=sha, crop_pct=1.0, **pre)
    assert not hit3
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2
    assert not list((tmp_path / "cache").glob("*.tmp"))
