"""The offline quickstart end to end through the CLI (the slowest test: a few minutes on 2 cores)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    result = run_cli("run", "--recipe", "quickstart", "--out", str(out), "--json", timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, json.loads(result.stdout)


@pytest.mark.slow
def test_summary_contract(quickstart):
    out, summary = quickstart
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["distillctl_version"]
    assert summary["method"] == "simreg"
    teacher, student = summary["teacher"], summary["student"]
    assert teacher["arch"] and len(teacher["sha256"]) == 64 and teacher["name"].startswith("pretrain:")
    assert student["arch"] == "test_resnet" and student["checkpoint"].endswith("student/model.safetensors")
    assert summary["train"]["epochs"] > 0 and summary["train"]["steps"] > 0
    assert summary["train"]["images_per_sec"] > 0 and summary["train"]["wall_s"] > 0
    assert summary["train"]["teacher_mode"] == "cached"
    parity = summary["export"]["onnx"]["parity"]
    assert parity["passed"] is True and parity["min_cosine"] >= 0.99999
    assert summary["recipe"]["name"] == "quickstart"
    assert summary["eval"]["protocol"]["k"] == [20] and summary["eval"]["protocol"]["temperature"] == 0.07
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"teacher", "cache", "distill", "eval", "export"} <= set(manifest["stages"])
    assert all(stage["status"] == "done" for stage in manifest["stages"].values())
    assert (out / "metrics.jsonl").read_text().count("\n") > 3


@pytest.mark.slow
def test_student_learned_something(quickstart):
    _, summary = quickstart
    student = summary["student"]["knn_top1"]
    random_student = summary["eval"]["random_student"]["knn_top1"]
    assert student > random_student + 2.0, (student, random_student)
    assert summary["teacher"]["knn_top1"] > 80.0


@pytest.mark.slow
def test_onnx_matches_saved_checkpoint(quickstart):
    import onnxruntime as ort
    import timm
    from safetensors.torch import load_file

    out, summary = quickstart
    config = json.loads((out / "student" / "config.json").read_text())
    model = timm.create_model(config["arch"], num_classes=0)
    model.load_state_dict(load_file(str(out / "student" / "model.safetensors")))
    model.eval()
    x = torch.randn(5, *config["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    onnx_path = out / summary["export"]["onnx"]["path"] if not summary["export"]["onnx"]["path"].startswith("/") \
        else summary["export"]["onnx"]["path"]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["embedding"], {"input": x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


@pytest.mark.slow
def test_rerun_skips_finished_stages(quickstart):
    out, summary = quickstart
    result = run_cli("run", "--recipe", "quickstart", "--out", str(out), "--json", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped" in result.stderr
    again = json.loads(result.stdout)
    assert again["student"]["sha256"] == summary["student"]["sha256"]
