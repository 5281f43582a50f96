"""Every catalogue-I method through the real CLI on builtin:digits with the tiny student: a few steps with a
finite loss, then kill -9 mid-run and ``--resume``: the final student weights and heads must equal an
uninterrupted run's bit for bit (queues, EMA encoders, centres and per-step CutMix included).

Slow (three CLI runs per method, ~1 min each on one core): ``pytest -m slow tests/methods/test_end_to_end.py``.
"""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

# queue sizes that the batch (16) does not divide, so every queue wraps around within the 5 steps
QUEUE = ["--set", "method.params.queue_size=40"]
DISTILL = {
    "smd": [],
    "disco": QUEUE + ["--set", "method.params.hidden_dim=32"],
    "bingo": QUEUE + ["--set", "method.params.hidden_dim=32"],
    "compress-2q": QUEUE,
    "compress-1q": QUEUE + ["--set", "method.params.teacher_input=centre"],
    "cosine-reg": [],
    "mse-reg": [],
    "seed-smallpatch": QUEUE + ["--set", "method.params.small_crops=2"],
}
SSL = {
    "ssl-small": QUEUE,
    "byol": ["--set", "method.params.projector_hidden_dim=64", "--set", "method.params.predictor_hidden_dim=64"],
    "dino": ["--set", "method.params.out_dim=256", "--set", "method.params.hidden_dim=64",
             "--set", "method.params.local_crops=2"],
}
COMMON = ["--set", "data.crop_pct=1.0", "--set", "data.subset=96", "--set", "export.enabled=false",
          "--set", "train.log_every=1", "--set", "train.checkpoint_every_steps=2", "--set", "train.max_steps=5"]


def _args(method: str, out, teacher) -> list[str]:
    if method in SSL:
        return ["pretrain", "--method", method, "--arch", "tiny-cnn", "--data", "builtin:digits", "--image-size", "16",
                "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--out", str(out), *COMMON, *SSL[method]]
    return ["run", "--teacher", str(teacher), "--teacher-arch", "resnet18", "--student", "tiny-cnn", "--method", method,
            "--data", "builtin:digits", "--image-size", "16", "--epochs", "2", "--batch-size", "16", "--lr", "0.05",
            "--out", str(out), "--set", "eval.teacher=false", *COMMON, *DISTILL[method]]


def _weights(run_dir) -> dict:
    return {name: load_file(str(run_dir / "student" / name)) for name in ("model.safetensors", "heads.safetensors")
            if (run_dir / "student" / name).exists()}


@pytest.mark.parametrize("method", list(DISTILL) + list(SSL))
def test_trains_and_resumes_exactly(tmp_path, tiny_teacher_file, method: str) -> None:
    full = run_cli(*_args(method, tmp_path / "full", tiny_teacher_file))
    assert full.returncode == 0, full.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("stage") in ("distill", "pretrain")]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses), losses
    if method in DISTILL:  # a few steps on fresh batches: the teacher target is learnt quickly
        assert min(losses[1:]) < losses[0], losses

    killed = run_cli(*_args(method, tmp_path / "resumed", tiny_teacher_file), env={"DISTILLCTL_TEST_KILL_AT_STEP": "3"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    resumed = run_cli(*_args(method, tmp_path / "resumed", tiny_teacher_file), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 2" in resumed.stderr

    expected, got = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert "model.safetensors" in expected and expected.keys() == got.keys()
    for name in expected:
        assert expected[name].keys() == got[name].keys()
        for key in expected[name]:
            assert expected[name][key].equal(got[name][key]), f"{method}: {name}:{key} differs after resume"
