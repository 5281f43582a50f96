"""The CPU-runnable parts of benchmarks/gpu_check.{sh,py}: shell syntax, part selection, and the data-loader and
cached-loop measurements at toy size on the CPU (the GPU numbers themselves need a lent GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


def test_gpu_check_sh_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_unknown_part_exits_2() -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--allow-cpu", "--parts", "loader,warp"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "warp" in json.loads(proc.stdout)["error"]


@pytest.mark.slow
def test_loader_and_cached_loop_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--allow-cpu", "--parts", "loader,loop", "--image-size", "32",
         "--batch-size", "8", "--loop-images", "24", "--loop-steps", "6", "--no-compile", "--workers", "0",
         "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON line on stdout
    result = json.loads(lines[0])
    assert result == json.loads(out.read_text())
    assert "loop_error" not in result, result.get("loop_error")
    assert result["parts"] == ["loader", "loop"] and result["loader_images"] == 48  # two passes over 24 images
    assert result["loader_img_s"] > 0 and result["cached_loop_img_s"] > 0
    assert isinstance(result["loader_keeps_up"], bool)
    assert "train.amp=bf16" in result["cached_loop_command"] and "train.channels_last=true" in result["cached_loop_command"]
    assert "student_step_img_s" not in result  # the synthetic GPU parts were not asked for
