"""``--resume`` continues whichever training stage was interrupted, the teacher's pretraining included."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.faults.run_helpers import assert_bit_exact

RECIPE = """
name: tiny-teacher-resume
teacher:
  source: pretrain
  pretrain: {method: mocov2, arch: tiny-cnn, epochs: 1, batch_size: 64, lr: 0.06, params: {queue_size: 128}}
  mode: online
student: {arch: tiny-cnn}
method: {name: simreg}
data: {train: builtin:digits, subset: 256, image_size: 16, crop_pct: 1.0}
train: {epochs: 1, batch_size: 64, log_every: 2, checkpoint_every_steps: 2}
eval: {knn_k: [5], teacher: false, random_student: false}
export: {enabled: false}
"""


@pytest.mark.slow
def test_resume_after_a_kill_in_the_teacher_stage(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)

    def run(out, *extra, env=None):
        return run_cli("run", "--recipe", str(recipe), "--out", str(tmp_path / out), *extra, env=env)

    killed = run("resumed", env={"DISTILLCTL_TEST_KILL_AT_STEP": "3"})  # teacher pretraining: step 3 of 4
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert (tmp_path / "resumed" / "teacher_pretrain" / "distill" / "checkpoints").is_dir()
    assert not (tmp_path / "resumed" / "distill").exists()

    resumed = run("resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming pretrain from step 2/4" in resumed.stderr

    full = run("full")
    assert full.returncode == 0, full.stderr[-3000:]
    assert_bit_exact(tmp_path / "full" / "teacher_pretrain", tmp_path / "resumed" / "teacher_pretrain")
    assert_bit_exact(tmp_path / "full", tmp_path / "resumed")


@pytest.mark.slow
def test_resume_with_nothing_interrupted_is_refused(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    result = run_cli("run", "--recipe", str(recipe), "--out", str(tmp_path / "run"), "--resume")
    assert result.returncode == 2 and "no checkpoint to resume from" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "teacher_pretrain").exists()  # refused before the teacher stage trains
