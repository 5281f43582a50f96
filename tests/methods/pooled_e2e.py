"""End-to-end helper for the issue-13 methods (EGA, DLKD, ProtoCPC, ProtoSEED): a few steps through the real CLI
on builtin:digits with the tiny student, the loss finite and falling, then kill -9 after step 3 and ``--resume``;
the resumed student and heads must equal the uninterrupted run's bit for bit (the same protocol as
tests/methods/test_end_to_end.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors.torch import load_file

from tests.conftest import run_cli

COMMON = ["--set", "data.crop_pct=1.0", "--set", "data.subset=96", "--set", "export.enabled=false",
          "--set", "eval.teacher=false", "--set", "train.log_every=1", "--set", "train.checkpoint_every_steps=2",
          "--set", "train.max_steps=6"]


def _args(method: str, out: Path, teacher: Path, extra: list[str]) -> list[str]:
    return ["run", "--teacher", str(teacher), "--teacher-arch", "resnet18", "--student", "tiny-cnn", "--method", method,
            "--data", "builtin:digits", "--image-size", "16", "--epochs", "2", "--batch-size", "16", "--lr", "0.05",
            "--out", str(out), *COMMON, *extra]


def _weights(run_dir: Path) -> dict:
    return {name: load_file(str(run_dir / "student" / name)) for name in ("model.safetensors", "heads.safetensors")}


def losses_of(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row.get("stage") == "distill"]


def train_and_resume(tmp_path: Path, teacher: Path, method: str, extra: list[str], falls_from: int | None = 0) -> list[float]:
    """Uninterrupted run, killed run, resumed run; asserts finite falling loss and bit-exact resume; returns losses.
    ``falls_from``: the step the loss must later fall below; None skips that check for a MoCo-type contrast, which
    at 16 px over 6 steps sits at chance level (the SSL methods of test_end_to_end skip it likewise)."""
    full = run_cli(*_args(method, tmp_path / "full", teacher, extra))
    assert full.returncode == 0, full.stderr[-3000:]
    losses = losses_of(tmp_path / "full")
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses), losses
    if falls_from is not None:
        assert min(losses[falls_from + 1:]) < losses[falls_from], losses

    killed = run_cli(*_args(method, tmp_path / "resumed", teacher, extra), env={"DISTILLCTL_TEST_KILL_AT_STEP": "3"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    resumed = run_cli(*_args(method, tmp_path / "resumed", teacher, extra), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 2" in resumed.stderr

    expected, got = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    for name in expected:
        assert expected[name].keys() == got[name].keys()
        for key in expected[name]:
            assert expected[name][key].equal(got[name][key]), f"{method}: {name}:{key} differs after resume"
    return losses


def check_recipes(method: str, spells_defaults: bool = True) -> None:
    """The published-setting recipe and the ``_cpu`` recipe validate (recipe schema, the method's Params, a known
    student, a registry teacher for the published one, builtin digits and a pretrained teacher for the CPU one), and
    (``spells_defaults``) the published recipe spells out the Params defaults."""
    from distillctl.config import load_recipe
    from distillctl.methods.base import get_method
    from distillctl.students import resolve_arch
    from distillctl.teachers.registry import load_registry
    from tests.conftest import REPO

    published = [p for p in (REPO / "recipes").glob(f"{method}_*.yaml") if not p.stem.endswith("_cpu")]
    assert len(published) == 1, published
    cls = get_method(method)
    for path in published + [REPO / "recipes" / f"{method}_cpu.yaml"]:
        recipe = load_recipe(str(path))
        assert recipe.method.name == method and recipe.name == path.stem
        params = cls.Params(**recipe.method.params)
        resolve_arch(recipe.student.arch)
        if path.stem.endswith("_cpu"):
            assert recipe.teacher.source == "pretrain" and recipe.data.train == "builtin:digits"
        else:
            load_registry().resolve(recipe.teacher.source)
            assert recipe.data.image_size == 224
            if spells_defaults:
                assert params == cls.Params(**{k: getattr(cls.Params(), k) for k in recipe.method.params})
