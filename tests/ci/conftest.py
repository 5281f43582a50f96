"""A tiny finished run shared by the CI-pipeline tests (gates, API, bundle, schemas): a random resnet18 teacher,
the tiny-cnn student for one epoch on builtin:digits at 16 px, kNN for teacher and student, ONNX fp32 + INT8."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

# The INT8 accuracy budget (kNN top-1 points) of the exports these tests make. The tiny run's 360 test images
# make one image 0.28 points, and its INT8 drop depends on the CPU's integer kernels: the TensorRT-form
# artefact dropped 1.11 points (4 images, parity 0.998) on an Intel Xeon with VNNI, over the default budget
# of 1. These tests check the pipeline's outputs, not INT8 accuracy (tests/export checks the gate itself).
INT8_MAX_DROP = "3"


def ci_run_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--teacher", str(teacher), "--teacher-arch", "resnet18", "--student", "tiny-cnn",
            "--method", "simreg", "--data", "builtin:digits", "--image-size", "16", "--epochs", "1",
            "--batch-size", "64", "--out", str(out), "--export", "onnx,onnx-int8",
            "--set", "data.crop_pct=1.0", "--set", "export.calib_size=64", "--set", "export.parity_images=16",
            "--set", "eval.random_student=false", "--set", "train.log_every=5",
            "--set", f"export.max_drop={INT8_MAX_DROP}", *extra]


@pytest.fixture(scope="session")
def ci_run(tiny_teacher_file, tmp_path_factory) -> tuple[Path, dict, str]:
    """(run directory, its summary, stderr) after one `distillctl run --json` that passed its (loose) gates."""
    out = tmp_path_factory.mktemp("ci-run") / "run"
    result = run_cli(*ci_run_args(tiny_teacher_file, out, "--set", "gates.min_student_knn=1", "--json"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads(result.stdout), result.stderr


@pytest.fixture()
def ci_run_copy(ci_run, tmp_path) -> Path:
    """A private copy of the shared run, for tests that change it."""
    copy = tmp_path / "run"
    shutil.copytree(ci_run[0], copy)
    return copy
