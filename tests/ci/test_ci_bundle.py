"""Release bundles (issue 17 §3): reproducible bytes, verify ok, then refused after one flipped byte."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.ci.conftest import INT8_MAX_DROP
from tests.conftest import run_cli

EXPORT = ("--format", "onnx,onnx-int8", "--calib-size", "64", "--parity-images", "16", "--bundle-samples", "6",
          "--max-drop", INT8_MAX_DROP)


def _files(root):
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_bundle_is_reproducible_verifies_and_refuses_a_flipped_byte(ci_run_copy, tmp_path):
    first, second = tmp_path / "b1", tmp_path / "b2"
    for out in (first, second):
        result = run_cli("export", str(ci_run_copy), *EXPORT, "--bundle", str(out), "--json")
        assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)["bundle"]
    files = _files(first)
    assert files == _files(second)  # same run, same bytes (the export was redone in between)
    assert {"model/student.onnx", "model/student.int8.onnx", "model_card.json", "summary.json", "samples/inputs.npy",
            "samples/reference.npy", "samples/samples.json", "manifest.json", "SHA256SUMS"} <= set(files)
    assert report["files"] == len(files) - 2
    inputs = np.load(first / "samples" / "inputs.npy")
    assert inputs.shape == (6, 3, 16, 16) and np.load(first / "samples" / "reference.npy").shape[0] == 6
    samples = json.loads((first / "samples" / "samples.json").read_text())
    assert samples["tolerances"]["model/student.onnx"] == "fp32"
    assert samples["tolerances"]["model/student.int8.onnx"] == "int8"

    ok = run_cli("verify", str(first), "--json")
    assert ok.returncode == 0, ok.stderr[-2000:]
    verified = json.loads(ok.stdout)
    assert verified["passed"] and verified["parity"]["model/student.onnx"]["min_cosine"] > 0.99999

    model = first / "model" / "student.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    bad = run_cli("verify", str(first))
    assert bad.returncode == 3 and "model/student.onnx: sha256" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.slow
def test_verify_reruns_parity_when_the_manifest_was_rewritten(ci_run_copy, tmp_path):
    out = tmp_path / "b"
    assert run_cli("export", str(ci_run_copy), *EXPORT, "--bundle", str(out)).returncode == 0
    reference = out / "samples" / "reference.npy"
    np.save(reference, -np.load(reference))  # a consistent-looking bundle whose model no longer matches
    manifest = json.loads((out / "manifest.json").read_text())
    from distillctl.rundir import file_sha256

    manifest["files"]["samples/reference.npy"]["sha256"] = file_sha256(reference)
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("verify", str(out))
    assert result.returncode == 3 and "bundle parity failed" in result.stderr and "min cosine" in result.stderr
    (out / "extra.txt").write_text("not shipped")
    result = run_cli("verify", str(out))
    assert result.returncode == 3 and "extra.txt: not in the manifest" in result.stderr


def test_verify_of_a_folder_that_is_no_bundle_is_a_usage_error(tmp_path):
    result = run_cli("verify", str(tmp_path))
    assert result.returncode == 2 and "not a distillctl bundle" in result.stderr


def test_artefact_precision_covers_onnx_and_openvino_names():
    from distillctl.export.bundle import artefact_precision

    assert [artefact_precision(name) for name in (
        "student.onnx", "student.fp16.onnx", "student.int8.onnx", "student.int8.trt.onnx", "student.openvino.xml",
        "student.int8.openvino.xml", "student.openvino.bin", "student.plan")] == [
        "fp32", "fp16", "int8", "int8", "fp32", "int8", None, None]

