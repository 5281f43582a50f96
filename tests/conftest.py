"""Shared fixtures. Tests make their own tiny data and checkpoints; nothing needs ../shared or a network."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DISTILLCTL_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / "distillctl-test-home"))

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m distillctl ARGS`` in a subprocess (real exit codes, real stderr)."""
    full_env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}  # log width: CLI's
    full_env.update({"OMP_NUM_THREADS": "1", **(env or {})})
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


@pytest.fixture(scope="session")
def trained_teacher_file(tmp_path_factory) -> Path:
    """A resnet10t backbone trained for a few epochs with labels on builtin:digits at 16 px: an informative
    teacher (kNN well above a random network) that takes seconds to make."""
    import timm
    import torch
    from safetensors.torch import save_file

    from distillctl.data.datasets import open_dataset
    from distillctl.data.views import ViewSpec, apply_view_uint8, normalize, sample_view

    torch.manual_seed(0)
    data = open_dataset("builtin:digits", "train")
    spec = ViewSpec(size=16, family="centre", crop_pct=1.0)
    images = torch.stack([apply_view_uint8(data.load_image(i), sample_view(spec, 32, 32, None), spec)
                          for i in range(len(data))])
    inputs = normalize(images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    labels = torch.tensor(data.labels)
    backbone = timm.create_model("resnet10t", num_classes=0)
    classifier = torch.nn.Linear(backbone.num_features, 10)
    optimizer = torch.optim.Adam(list(backbone.parameters()) + list(classifier.parameters()), lr=3e-3)
    for _ in range(4):
        for batch in torch.randperm(len(labels)).split(64):
            loss = torch.nn.functional.cross_entropy(classifier(backbone(inputs[batch])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    path = tmp_path_factory.mktemp("trained_teacher") / "teacher_r10t.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return path


@contextmanager
def temporary_methods(*classes) -> Iterator[None]:
    """Register test-only method classes for the duration of a test, so registry-wide tests elsewhere never see
    them (the registry is process-global)."""
    from distillctl.methods import base

    for cls in classes:
        base.register(cls)
    try:
        yield
    finally:
        for cls in classes:
            base._REGISTRY.pop(cls.name, None)


def tiny_run_args(teacher: Path, out: Path, *extra: str, method: str = "simreg") -> list[str]:
    """A distillation run that takes a few seconds on one core."""
    arch = "resnet10t" if "r10t" in teacher.name else "resnet18"
    return ["run", "--teacher", str(teacher), "--teacher-arch", arch, "--student", "tiny-cnn",
            "--method", method, "--data", "builtin:digits", "--image-size", "16", "--epochs", "2",
            "--batch-size", "64", "--out", str(out), "--set", "data.crop_pct=1.0", "--set", "export.enabled=false",
            "--set", "train.log_every=5", "--set", "eval.teacher=false",
            "--set", "eval.random_student=false", *extra]


@pytest.fixture()
def log_lines() -> list[str]:
    """Messages of the ``distillctl.*`` log records emitted during the test. Domain code logs and only the CLI
    renders (``warning: …``), so in-process tests read the records, whatever handlers a CLI import installed."""
    import logging

    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = _Collect(level=logging.DEBUG)
    logger = logging.getLogger("distillctl")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)
