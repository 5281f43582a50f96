"""One bad-image policy for every stage that decodes images (data/bad_images.py): training and the cache
substitute, evaluation skips, export calibration substitutes; each counts, lists, says so on screen and
stops (exit 2) only above data.max_bad_fraction. Regression: a truncated JPEG in --val-data used to stop
the run after training with ``OSError: Truncated File Read`` (exit 1)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from distillctl.data.bad_images import BadImages, load_or_substitute, try_load
from distillctl.data.datasets import open_dataset
from distillctl.errors import InputError
from distillctl.eval.features import embed_dataset
from tests.conftest import run_cli


def _jpeg(rng: np.random.Generator, size: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_folder(root: Path, good_per_class: int, seed: int = 0) -> Path:
    """Two classes of ``good_per_class`` JPEGs; class ``b`` also holds one truncated JPEG (``b/zz broken.jpg``)."""
    rng = np.random.default_rng(seed)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(good_per_class):
            (root / name / f"{i:02d}.jpg").write_bytes(_jpeg(rng))
    (root / "b" / "zz broken.jpg").write_bytes(_jpeg(rng)[:300])  # header intact, scan data cut
    return root


@pytest.fixture()
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data", good_per_class=10)


def _broken(dataset) -> int:
    return next(i for i, path in enumerate(dataset.paths) if "broken" in path)


def test_try_load_and_keyed_substitute(folder):
    dataset = open_dataset(folder)
    broken = _broken(dataset)
    image, entries = try_load(dataset, broken)
    assert image is None and entries[0][0].endswith("zz broken.jpg") and entries[0][1].startswith("OSError")
    chosen, image, entries = load_or_substitute(dataset, broken)
    assert chosen == (broken + 7919) % len(dataset) and image is not None and len(entries) == 1
    assert load_or_substitute(dataset, broken)[0] == chosen  # deterministic (exact resume, same on every rank)
    assert load_or_substitute(dataset, 0)[2] == []


def test_limit_is_checked_and_the_list_written(tmp_path, log_lines):
    bad = BadImages("eval", total=40, max_fraction=0.05)
    bad.add([("x/b.jpg", "OSError: Truncated File Read"), ("x/a.jpg", "OSError: broken data stream")])
    summary = bad.finish("skipped", tmp_path / "bad_images_eval.txt")  # 2 of 40 = 5 %: not above the limit
    assert summary == {"unreadable_images": 2, "unreadable_list": "bad_images_eval.txt", "unreadable_action": "skipped"}
    assert (tmp_path / "bad_images_eval.txt").read_text().splitlines() == [
        "x/a.jpg: OSError: broken data stream", "x/b.jpg: OSError: Truncated File Read"]
    (line,) = log_lines
    assert line.startswith("eval: 2 unreadable image(s) skipped (limit 5.0% of 40)") and "first: x/a.jpg" in line
    bad.add([("x/c.jpg", "OSError: x")])
    with pytest.raises(InputError, match=r"^eval: 3 unreadable images \(> 5.0% of 40\); first: x/a.jpg") as raised:
        bad.check()
    assert "max_bad_fraction" in raised.value.hint


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()


def test_embedding_skips_unreadable_images(folder):
    dataset = open_dataset(folder)
    bad = BadImages("eval", len(dataset), max_fraction=0.1)
    embeddings, labels = embed_dataset(_encoder(), dataset, input_size=8, mean=(0.5,) * 3, std=(0.25,) * 3,
                                       crop_pct=1.0, batch_size=8, bad_images=bad)
    readable = [i for i in range(len(dataset)) if i != _broken(dataset)]
    assert embeddings.shape == (20, 4) and labels.tolist() == [dataset.labels[i] for i in readable]
    alone, _ = embed_dataset(_encoder(), dataset.subset(readable), input_size=8, mean=(0.5,) * 3, std=(0.25,) * 3,
                             crop_pct=1.0, batch_size=8)
    assert torch.equal(alone, embeddings)  # the same rows as embedding the readable images alone
    assert list(bad.found) == [dataset.paths[_broken(dataset)]]
    with pytest.raises(InputError, match=r"^eval: 1 unreadable images \(> 1.0% of 21\)"):  # no collector: 1 % default
        embed_dataset(_encoder(), dataset, input_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0)


def test_index_aligned_embedding_substitutes(folder):
    """kNN bags index the embeddings by image: with ``substitute`` row i stays image i's (the bad one gets its
    keyed substitute's embedding), so no later row shifts."""
    dataset = open_dataset(folder)
    broken = _broken(dataset)
    bad = BadImages("bags", len(dataset), max_fraction=0.1)
    embeddings, _ = embed_dataset(_encoder(), dataset, input_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0,
                                  batch_size=8, bad_images=bad, substitute=True)
    assert embeddings.shape == (21, 4) and len(bad) == 1
    substitute = load_or_substitute(dataset, broken)[0]
    assert torch.equal(embeddings[broken], embeddings[substitute])


def test_cache_build_substitutes_lists_and_respects_the_limit(folder, tmp_path, log_lines):
    from distillctl.cache.build import build_cache
    from distillctl.data.views import ViewSpec
    from tests.cache.cache_helpers import MEAN, STD, make_teacher

    dataset = open_dataset(folder)
    common = dict(spec=ViewSpec(size=16, family="weak"), views=2, outputs={"pooled"}, mean=MEAN, std=STD,
                  batch_size=8, progress=False)
    cache = build_cache(make_teacher(), dataset, tmp_path / "cache", max_bad_fraction=0.1, **common)
    assert cache.is_complete()
    listed = (tmp_path / "cache" / "bad_images.txt").read_text().splitlines()
    assert len(listed) == 1 and "zz broken.jpg: OSError" in listed[0]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["build"]["unreadable_images"] == 1
    assert any(line.startswith("cache: 1 unreadable image(s) substituted") for line in log_lines)
    from distillctl.cache.drift import spot_check

    report = spot_check(cache, make_teacher(), dataset, samples=2 * len(dataset))  # every (image, view), the bad one too
    assert min(report["min_cosine"].values()) > 0.999  # replayed on the same substitute the build used
    assert any(line.startswith("cache check: 1 unreadable image(s) substituted") for line in log_lines)
    with pytest.raises(InputError, match=r"^cache: 1 unreadable images \(> 1.0% of 21\)"):
        build_cache(make_teacher(), dataset, tmp_path / "strict", max_bad_fraction=0.01, **common)


def test_export_calibration_substitutes(folder, log_lines):
    from distillctl.export.api import _eval_images

    dataset = open_dataset(folder)
    indices = np.array([0, _broken(dataset), 5])
    batch = _eval_images(dataset, indices, 8, SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3), 1.0, 0.1)
    assert batch.shape == (3, 3, 8, 8) and torch.isfinite(batch).all()  # the sample keeps its size
    assert any(line.startswith("export: 1 unreadable image(s) substituted (limit 10.0% of 21)") for line in log_lines)


@pytest.mark.slow  # one tiny run: train, eval (kNN), no export
def test_run_with_truncated_jpegs_in_train_and_val(tmp_path, tiny_teacher_file):
    train = make_folder(tmp_path / "train", good_per_class=24)  # 49 images: 1 unreadable (2 %)
    val = make_folder(tmp_path / "val", good_per_class=10, seed=1)  # 21 images: 1 unreadable
    out = tmp_path / "run"
    result = run_cli("run", "--teacher", str(tiny_teacher_file), "--teacher-arch", "resnet18", "--student", "tiny-cnn",
                     "--method", "simreg", "--data", str(train), "--val-data", str(val), "--image-size", "16",
                     "--epochs", "1", "--batch-size", "16", "--teacher-mode", "online", "--out", str(out),
                     "--set", "data.crop_pct=1.0", "--set", "export.enabled=false", "--set", "eval.teacher=false",
                     "--set", "eval.random_student=false", "--set", "data.max_bad_fraction=0.05", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    err = " ".join(result.stderr.split())
    assert "train: 1 unreadable image(s) substituted (limit 5.0% of 49)" in err
    assert "eval: 2 unreadable image(s) skipped (limit 5.0% of 70)" in err  # the bank's and the queries' file
    summary = json.loads(result.stdout)
    assert summary["eval"]["unreadable_images"] == 2 and summary["eval"]["unreadable_list"] == "bad_images_eval.txt"
    listed = (out / "bad_images_eval.txt").read_text()
    assert str(train / "b" / "zz broken.jpg") in listed and str(val / "b" / "zz broken.jpg") in listed
    assert "zz broken.jpg: OSError" in (out / "bad_images.txt").read_text()
    assert summary["student"]["knn_top1"] >= 0
