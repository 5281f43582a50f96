"""Tiny distillation runs shared by the fault and distributed tests (16 px, 256 digits, a few steps)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import REPO


def small_run_args(teacher: Path, out: Path, *extra: str, mode: str = "online") -> list[str]:
    """8 steps (256 images / global batch 32), checkpoints every 3 steps, no export."""
    return ["run", "--teacher", str(teacher), "--teacher-arch", "resnet18", "--student", "tiny-cnn",
            "--method", "simreg", "--data", "builtin:digits", "--image-size", "16", "--epochs", "1",
            "--batch-size", "32", "--lr", "0.02", "--teacher-mode", mode, "--out", str(out),
            "--set", "data.subset=256", "--set", "data.crop_pct=1.0", "--set", "export.enabled=false",
            "--set", "eval.teacher=false", "--set", "train.log_every=2", "--set", "train.checkpoint_every_steps=3",
            *extra]


def weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(run_dir / "student" / name)) for name in ("model.safetensors", "heads.safetensors")}


def assert_bit_exact(expected_dir: Path, got_dir: Path) -> None:
    expected, got = weights(expected_dir), weights(got_dir)
    for name in expected:
        assert expected[name].keys() == got[name].keys()
        for key in expected[name]:
            assert expected[name][key].equal(got[name][key]), f"{name}:{key} differs"


def max_difference(expected_dir: Path, got_dir: Path, skip_running_stats: bool = False) -> tuple[float, str]:
    """Largest |a - b| relative to max(1, |a|max) over every tensor of student + heads, and where."""
    worst = (0.0, "")
    expected, got = weights(expected_dir), weights(got_dir)
    for name in expected:
        for key, a in expected[name].items():
            if skip_running_stats and ("running_" in key or "num_batches" in key):
                continue
            b = got[name][key]
            if a.is_floating_point():
                diff = float((a - b).abs().max()) / max(1.0, float(a.abs().max()))
                worst = max(worst, (diff, f"{name}:{key}"))
    return worst


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("DISTILLCTL_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "distillctl", *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_when_paused(process: subprocess.Popen, marker: Path, sig: int = signal.SIGTERM,
                       timeout: float = 300) -> tuple[int, str, str]:
    """Wait for the pause hook's marker file, send ``sig`` to the pid it names, return (rc, stdout, stderr)."""
    deadline = time.monotonic() + timeout
    while not marker.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            out, err = process.communicate(timeout=60)
            raise AssertionError(f"never paused (rc={process.returncode}): {err[-3000:]}")
        time.sleep(0.1)
    time.sleep(0.1)
    os.kill(int(marker.read_text()), sig)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err
