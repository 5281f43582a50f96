"""Fingerprints are taken over content: a finished run moved to another folder skips every stage on rerun."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

TINY_RECIPE = """
name: tiny-moved
teacher:
  source: pretrain
  pretrain: {method: mocov2, arch: tiny-cnn, epochs: 1, batch_size: 64, lr: 0.06, params: {queue_size: 128}}
  cache_views: 2
student: {arch: tiny-cnn}
method: {name: simreg}
data: {train: builtin:digits, subset: 256, image_size: 16, crop_pct: 1.0}
train: {epochs: 1, batch_size: 64, log_every: 2}
eval: {knn_k: [5], teacher: false, random_student: false}
export: {formats: [onnx], parity_images: 8}
"""

PRODUCTS = ("student/model.safetensors", "student/heads.safetensors", "export/student.onnx",
            "teacher_pretrain/student/model.safetensors", "cache/manifest.json")


def _stamps(run: Path) -> dict[str, tuple[int, bytes]]:
    return {name: ((run / name).stat().st_mtime_ns, (run / name).read_bytes()) for name in PRODUCTS}


@pytest.mark.slow
def test_moved_run_skips_every_finished_stage(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    first_dir, moved_dir = tmp_path / "first" / "run", tmp_path / "elsewhere" / "deeper" / "run"
    first = run_cli("run", "--recipe", str(recipe), "--out", str(first_dir), "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    stages = json.loads((first_dir / "manifest.json").read_text())["stages"]
    assert set(stages) == {"teacher", "cache", "distill", "eval", "export"}

    moved_dir.parent.mkdir(parents=True)
    shutil.move(str(first_dir), str(moved_dir))
    before = _stamps(moved_dir)
    again = run_cli("run", "--recipe", str(recipe), "--out", str(moved_dir), "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _stamps(moved_dir) == before  # nothing retrained, rebuilt or re-exported
    assert "step " not in again.stderr and "cache build" not in again.stderr, again.stderr
    said = " ".join(again.stderr.split())
    for stage in ("cache", "distill", "eval", "export"):  # the teacher's own pretraining run says so too
        assert f"{stage}: finished earlier with the same inputs; skipped" in said, (stage, again.stderr)
    assert said.count("distill: finished earlier with the same inputs; skipped") == 2  # teacher's run + this one
    after = json.loads((moved_dir / "manifest.json").read_text())["stages"]
    assert {name: entry["fingerprint"] for name, entry in after.items()} == \
        {name: entry["fingerprint"] for name, entry in stages.items()}
    summary = json.loads(again.stdout)
    assert summary["run_dir"] == str(moved_dir)
    assert summary["student"]["sha256"] == json.loads(first.stdout)["student"]["sha256"]
