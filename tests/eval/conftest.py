"""Shared fixtures for the eval tests: a tiny saved student (timm test_resnet, 32 px) and its ONNX export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_helpers import export_onnx, save_student


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, torch.nn.Module, Path]:
    """(run dir with a student, the model, its ONNX export at run/export/student.onnx without metadata)."""
    run_dir = tmp_path_factory.mktemp("run")
    model = save_student(run_dir)
    onnx_path = export_onnx(model, run_dir / "export" / "student.onnx")
    return run_dir, model, onnx_path
