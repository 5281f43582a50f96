"""Shared fixtures. Tests make their own tiny data and checkpoints; nothing needs ../shared or a network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DISTILLCTL_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / "distillctl-test-home"))

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m distillctl ARGS`` in a subprocess (real exit codes, real stderr)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("DISTILLCTL_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "distillctl", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_teacher_file(tmp_path_factory) -> Path:
    """A random-init timm resnet18 backbone saved as safetensors (a plain local teacher)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=0)
    path = tmp_path_factory.mktemp("teacher") / "teacher_r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tiny_run_args(teacher: Path, out: Path, *extra: str, method: str = "simreg") -> list[str]:
    """A distillation run that takes a few seconds on one core."""
    return ["run", "--teacher", str(teacher), "--teacher-arch", "resnet18", "--student", "tiny-cnn",
            "--method", method, "--data", "builtin:digits", "--image-size", "16", "--epochs", "2",
            "--batch-size", "64", "--out", str(out), "--set", "data.crop_pct=1.0", "--set", "export.enabled=false",
            "--set", "train.log_every=5", "--set", "eval.teacher=false",
            "--set", "eval.random_student=false", *extra]
