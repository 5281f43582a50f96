"""Every registered method through the real CLI on builtin:digits with the tiny student: a few steps with a
finite loss, then kill -9 mid-run and ``--resume``: the final student weights and heads must equal an
uninterrupted run's bit for bit (queues, EMA encoders, centres and per-step CutMix included).

Slow (three CLI runs per method, ~1 min each on one core): ``pytest -m slow tests/methods/test_end_to_end.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distillctl.methods.base import registry
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

METHODS = sorted(registry())  # every registered method: a new one is covered without editing this file
VARIANTS = {"compress-1q": ["--set", "method.params.teacher_input=centre"]}  # extra paths worth exercising
COMMON = ["--set", "data.crop_pct=1.0", "--set", "data.subset=96", "--set", "export.enabled=false",
          "--set", "train.log_every=1", "--set", "train.checkpoint_every_steps=2", "--set", "train.max_steps=5"]


def _shrunk(method: str) -> list[str]:
    """Sizes for 16-px digits, read from the method's Params: queues of 40 (the batch of 16 does not divide them,
    so every queue wraps within the 5 steps), any other size above 256 (heads, prototypes) 64, two extra crops."""
    sets = []
    for name, field in registry()[method].Params.model_fields.items():
        default = field.default
        if name == "queue_size":
            sets.append(f"method.params.{name}=40")
        elif name.endswith("_crops"):
            sets.append(f"method.params.{name}=2")
        elif isinstance(default, int) and not isinstance(default, bool) and default > 256:
            sets.append(f"method.params.{name}=64")
    return [arg for value in sets for arg in ("--set", value)] + VARIANTS.get(method, [])


def _own_end_to_end(method: str) -> bool:
    """A method whose own test file already trains, kills and resumes it: the issue-13 methods' pooled_e2e, and the
    ViT-only methods (this file's tiny CNN student cannot run them; test_mae_lite.py covers mae and mae-lite)."""
    path = Path(__file__).with_name(f"test_{method.replace('-', '_')}.py")
    if path.is_file() and "def test_trains_and_resumes_exactly" in path.read_text():
        return True
    if getattr(registry()[method], "vit_only", False):
        own = [p for p in Path(__file__).parent.glob("test_*.py") if p.name != Path(__file__).name]
        return any(f'"{method}"' in p.read_text() and "resumes_exactly" in p.read_text() for p in own)
    return False


def _args(method: str, out, teacher) -> list[str]:
    if registry()[method].kind == "ssl":
        return ["pretrain", "--method", method, "--arch", "tiny-cnn", "--data", "builtin:digits", "--image-size", "16",
                "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--out", str(out), *COMMON, *_shrunk(method)]
    extra = ["--extra-teacher", f"{teacher}@resnet18"] if registry()[method].multi_teacher else []
    return ["run", "--teacher", str(teacher), "--teacher-arch", "resnet18", *extra, "--student", "tiny-cnn",
            "--method", method, "--data", "builtin:digits", "--image-size", "16", "--epochs", "2", "--batch-size", "16",
            "--lr", "0.05", "--out", str(out), "--set", "eval.teacher=false", *COMMON, *_shrunk(method)]


def _weights(run_dir) -> dict:
    return {name: load_file(str(run_dir / "student" / name)) for name in ("model.safetensors", "heads.safetensors")
            if (run_dir / "student" / name).exists()}


@pytest.mark.parametrize("method", METHODS)
def test_trains_and_resumes_exactly(tmp_path, tiny_teacher_file, method: str) -> None:
    if _own_end_to_end(method):
        pytest.skip(f"{method}: trained, killed and resumed by its own test file")
    full = run_cli(*_args(method, tmp_path / "full", tiny_teacher_file))
    assert full.returncode == 0, full.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("stage") in ("distill", "pretrain")]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses), losses
    if registry()[method].kind == "distill":  # a few steps on fresh batches: the teacher target is learnt quickly
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
