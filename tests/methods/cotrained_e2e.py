"""End-to-end helper for the co-trained-teacher methods (DoGo, OSS, SimDis online): a few steps through the real CLI
on builtin:digits, the teacher a tiny network trained from scratch with the student (``--teacher scratch``); the
loss finite and falling; then kill -9 after step 3 and ``--resume``: student, heads and the co-trained teacher must
equal the uninterrupted run's bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors.torch import load_file

from tests.conftest import run_cli

COMMON = ["--set", "data.crop_pct=1.0", "--set", "data.subset=96", "--set", "export.enabled=false",
          "--set", "eval.teacher=false", "--set", "train.log_every=1", "--set", "train.checkpoint_every_steps=2",
          "--set", "train.max_steps=6"]
FILES = ("model.safetensors", "heads.safetensors", "teacher_cotrained.safetensors")


def _args(method: str, out: Path, teacher: list[str], extra: list[str]) -> list[str]:
    return ["run", *teacher, "--student", "tiny-cnn", "--method", method, "--data", "builtin:digits",
            "--image-size", "16", "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--out", str(out), *COMMON,
            *extra]


def losses_of(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row.get("stage") == "distill"]


def train_and_resume(tmp_path: Path, method: str, extra: list[str],
                     teacher: list[str] | None = None) -> list[dict]:
    """Uninterrupted, killed and resumed runs; asserts a finite falling loss and a bit-exact resume of the student,
    the heads and the co-trained teacher; returns the uninterrupted run's metric rows."""
    teacher = teacher or ["--teacher", "scratch", "--teacher-arch", "tiny-cnn"]
    full = run_cli(*_args(method, tmp_path / "full", teacher, extra))
    assert full.returncode == 0, full.stderr[-3000:]
    rows = losses_of(tmp_path / "full")
    losses = [row["loss"] for row in rows]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses), losses
    assert min(losses[1:]) < losses[0], losses
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["teacher"]["mode"] == "co_trained", summary["teacher"]

    killed = run_cli(*_args(method, tmp_path / "resumed", teacher, extra), env={"DISTILLCTL_TEST_KILL_AT_STEP": "3"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    resumed = run_cli(*_args(method, tmp_path / "resumed", teacher, extra), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 2" in resumed.stderr

    for name in FILES:
        expected = load_file(str(tmp_path / "full" / "student" / name))
        got = load_file(str(tmp_path / "resumed" / "student" / name))
        assert expected and expected.keys() == got.keys(), name
        for key in expected:
            assert expected[key].equal(got[key]), f"{method}: {name}:{key} differs after resume"
    return rows
