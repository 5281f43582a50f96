"""``distillctl eval knn|linear``: exit codes, JSON output, run-dir splits, summary.json merge, artefact targets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from distillctl.cli import main


def _run(argv, capsys):
    """Call the CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A fresh copy of the tiny run (summary.json is written into it)."""
    run_dir, _, _ = tiny_run
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def test_missing_target_exits_2(tmp_path, capsys):
    code, out, err = _run(["eval", "knn", str(tmp_path / "missing"), "--data", "builtin:digits"], capsys)
    assert code == 2 and out == ""
    assert "does not exist" in err and "Traceback" not in err


def test_bad_inputs_exit_2(run_copy, tmp_path, capsys):
    # No --data and no recipe.yaml in the run: nothing says which data to use.
    code, _, err = _run(["eval", "knn", str(run_copy)], capsys)
    assert code == 2 and "--data" in err
    # An ImageFolder without a val split: exit 2 with a hint.
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "folder" / cls / "x.png")
    code, _, err = _run(["eval", "knn", str(run_copy), "--data", str(tmp_path / "folder")], capsys)
    assert code == 2 and "no labelled evaluation split" in err and "--val-data" in err
    code, _, err = _run(["eval", "knn", str(run_copy), "--data", "builtin:digits", "--k", "0"], capsys)
    assert code == 2 and "--k" in err
    code, _, err = _run(["eval", "knn", str(run_copy), "--data", "builtin:digits", "--k", "5000"], capsys)
    assert code == 2 and "exceeds" in err


def test_knn_json_checkpoint_and_onnx_agree_and_summary_is_merged(run_copy, capsys):
    (run_copy / "summary.json").write_text(json.dumps({"method": "simreg", "eval": {"teacher": {"knn_top1": 90.0}}}))
    code, out, err = _run(["eval", "knn", str(run_copy), "--data", "builtin:digits", "--k", "1,20", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)  # exactly one JSON object on stdout
    assert set(result["knn"]) == {"1", "20"} and result["protocol"]["temperature"] == 0.07
    assert result["data"]["n_train"] == 1437 and result["data"]["n_val"] == 360
    assert result["knn"]["20"] > 20.0
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["method"] == "simreg" and summary["eval"]["teacher"] == {"knn_top1": 90.0}
    assert summary["eval"]["student"]["knn"] == result["knn"]
    assert not list(run_copy.glob("*.tmp")) and not list(run_copy.glob(".summary*"))
    # The exported artefact, evaluated the same way, scores the same; the run's summary is left alone.
    code, out, err = _run(["eval", "knn", str(run_copy / "export" / "student.onnx"), "--data", "builtin:digits",
                           "--k", "1,20", "--json"], capsys)
    assert code == 0, err
    onnx_result = json.loads(out)
    assert onnx_result["knn"] == result["knn"] and onnx_result["encoder"].startswith("onnx")
    assert json.loads((run_copy / "summary.json").read_text()) == summary


def test_run_dir_splits_come_from_the_recipe(run_copy, capsys):
    from distillctl.config import build_recipe

    recipe = build_recipe({"data": {"train": "builtin:digits", "crop_pct": 1.0},
                           "eval": {"knn_k": [5, 50], "knn_temperature": 0.1}})
    (run_copy / "recipe.yaml").write_text(recipe.to_yaml())
    code, out, err = _run(["eval", "knn", str(run_copy), "--json", "--no-cache"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["protocol"]["transform"]["crop_pct"] == 1.0
    assert set(result["knn"]) == {"5", "50"} and result["protocol"]["temperature"] == 0.1  # the run's protocol
    assert result["data"]["val"] == "builtin:digits" and result["data"]["n_val"] == 360
    assert not (run_copy / "eval_cache").exists()
    # Explicit data still uses the run's crop; an explicit --crop-pct wins over both.
    code, out, _ = _run(["eval", "knn", str(run_copy), "--data", "builtin:digits", "--json", "--no-cache"], capsys)
    assert json.loads(out)["protocol"]["transform"]["crop_pct"] == 1.0
    code, out, _ = _run(["eval", "knn", str(run_copy), "--crop-pct", "0.5", "--json", "--no-cache"], capsys)
    assert json.loads(out)["protocol"]["transform"]["crop_pct"] == 0.5


def test_linear_cli_records_protocol_and_reuses_cached_features(run_copy, capsys):
    argv = ["eval", "linear", str(run_copy), "--data", "builtin:digits", "--epochs", "5", "--lrs", "0.1,1",
            "--wds", "0,1e-3", "--json"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    first = json.loads(out)
    linear = first["linear"]
    assert linear["top1"] > 50.0 and len(linear["sweep"]) == 4
    assert first["protocol"]["epochs"] == 5 and first["protocol"]["lrs"] == [0.1, 1.0]
    assert first["timing"]["train_cached"] is False
    code, out, err = _run(argv, capsys)
    second = json.loads(out)
    assert second["timing"]["train_cached"] is True and second["linear"] == linear
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["eval"]["student"]["linear"]["top1"] == linear["top1"]
    # Human output goes to stderr, never stdout.
    code, out, err = _run(argv[:-1], capsys)
    assert code == 0 and out == "" and "chosen" in err and "val top-1" in err


def test_teacher_target_is_evaluated_under_the_same_protocol(run_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTILLCTL_HOME", str(tmp_path / "home"))
    weights = run_copy / "student" / "model.safetensors"  # a plain timm test_resnet state dict
    argv = ["eval", "knn", f"teacher:{weights}", "--teacher-arch", "test_resnet", "--input-size", "32",
            "--data", "builtin:digits", "--k", "20", "--cache-dir", str(tmp_path / "cache"), "--json"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["encoder"].startswith("teacher") and result["knn"]["20"] > 20.0
    transform = result["protocol"]["transform"]
    # a distillctl student used as a teacher brings its own preprocessing (student/config.json as sidecar)
    student_mean = json.loads((run_copy / "student" / "config.json").read_text())["mean"]
    assert transform["size"] == 32 and transform["mean"] == pytest.approx(student_mean)
    code, out, _ = _run(argv, capsys)
    assert json.loads(out)["timing"]["val_cached"] is True  # keyed by the teacher's sha256
    # the student's config.json names its architecture; a bare weights file does not
    code, out, _ = _run(["eval", "knn", f"teacher:{weights}", "--data", "builtin:digits", "--json"], capsys)
    assert code == 0 and json.loads(out)["encoder"].startswith("teacher")
    bare = tmp_path / "bare" / "model.safetensors"
    bare.parent.mkdir()
    shutil.copyfile(weights, bare)
    code, _, err = _run(["eval", "knn", f"teacher:{bare}", "--data", "builtin:digits"], capsys)
    assert code == 2 and "--teacher-arch" in err


def test_image_folder_train_val_layout(run_copy, tmp_path, capsys):
    """A DATA dir with train/ and val/ inside; file decoding goes through DataLoader workers."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for cls, level in (("dark", 30), ("bright", 220)):
            folder = tmp_path / "imgs" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(level + rng.normal(0, 10, (20, 28, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    code, out, err = _run(["eval", "knn", str(run_copy), "--data", str(tmp_path / "imgs"), "--k", "1,3",
                           "--num-workers", "1", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["data"]["n_train"] == 12 and result["data"]["n_val"] == 6 and result["data"]["num_classes"] == 2
    assert result["knn"] == {"1": 100.0, "3": 100.0}
    # A val folder lacking the first class: its labels are re-indexed to train's classes by name.
    shutil.rmtree(tmp_path / "imgs" / "val" / "bright")
    code, out, err = _run(["eval", "knn", str(run_copy), "--data", str(tmp_path / "imgs" / "train"), "--val-data",
                           str(tmp_path / "imgs" / "val"), "--k", "1", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["knn"] == {"1": 100.0} and json.loads(out)["data"]["n_val"] == 3
    (tmp_path / "imgs" / "val" / "other").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "val" / "other" / "x.png")
    code, _, err = _run(["eval", "knn", str(run_copy), "--data", str(tmp_path / "imgs" / "train"), "--val-data",
                         str(tmp_path / "imgs" / "val"), "--k", "1"], capsys)
    assert code == 2 and "do not exist in the train split" in err
