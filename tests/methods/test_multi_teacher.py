"""Several teachers in one run (recipe ``teacher.extra`` / ``--extra-teacher``): the ensemble's output routing,
``simreg-multi`` through the CLI from a feature cache holding both teachers' outputs and with the teachers online,
exact resume, and the errors when the method and the number of teachers do not fit."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distillctl.errors import UsageError
from distillctl.teachers.base import Teacher
from distillctl.teachers.ensemble import TeacherEnsemble
from tests.conftest import run_cli


def _teacher(name: str, dim: int, proj: int | None, seed: int) -> Teacher:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, dim))
    projection = nn.Linear(dim, proj) if proj else None
    return Teacher(name=name, arch="mlp", backbone=backbone, embed_dim=dim, sha256=f"{seed:064x}",
                   projection=projection, proj_dim=proj, license="MIT" if seed else "CC-BY-NC-4.0").freeze()


def test_ensemble_routes_each_key_to_its_teacher() -> None:
    first, second = _teacher("a", 5, 3, 0), _teacher("b", 7, None, 1)
    ensemble = TeacherEnsemble.of([first, second])
    x = torch.randn(2, 3, 4, 4)
    out = ensemble.forward(x, {"pooled_0", "proj_0", "pooled_1", "pooled"})
    assert set(out) == {"pooled_0", "proj_0", "pooled_1", "pooled"}
    with torch.no_grad():
        assert out["pooled_0"].equal(first.backbone(x)) and out["pooled"].equal(first.backbone(x))
        assert out["proj_0"].equal(first.projection(first.backbone(x)))
        assert out["pooled_1"].equal(second.backbone(x))
    assert ensemble.member_dims() == [(5, 3), (7, None)]
    for bad in ({"proj_1"}, {"pooled_2"}, {"logits"}):  # no head / no such teacher / no such output
        with pytest.raises(UsageError):
            ensemble.forward(x, bad)
    described = ensemble.describe()
    assert [m["name"] for m in described["members"]] == ["a", "b"] and described["arch"] == "mlp+mlp"
    assert described["license"] == "CC-BY-NC-4.0; MIT"
    assert TeacherEnsemble.of([second, first]).sha256 != ensemble.sha256  # the order is part of the identity
    with pytest.raises(UsageError):
        TeacherEnsemble.of([first])


def _args(out, first, second, *extra: str) -> list[str]:
    return ["run", "--method", "simreg-multi", "--teacher", str(first), "--teacher-arch", "resnet10t",
            "--extra-teacher", f"{second}@resnet18", "--student", "tiny-cnn", "--data", "builtin:digits",
            "--image-size", "16", "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--out", str(out),
            "--set", "data.crop_pct=1.0", "--set", "data.subset=96", "--set", "export.enabled=false",
            "--set", "eval.teacher=false", "--set", "eval.random_student=false", "--set", "train.log_every=1",
            "--set", "train.checkpoint_every_steps=2", "--set", "train.max_steps=5", "--cache-views", "2", *extra]


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row.get("stage") == "distill"]


@pytest.mark.slow
def test_two_teachers_from_one_cache_train_and_resume_exactly(tmp_path, trained_teacher_file, tiny_teacher_file) -> None:
    full = run_cli(*_args(tmp_path / "full", trained_teacher_file, tiny_teacher_file))
    assert full.returncode == 0, full.stderr[-3000:]
    losses = _losses(tmp_path / "full")
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses) and min(losses[1:]) < losses[0], losses
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["train"]["teacher_mode"] == "cached"
    assert [m["arch"].split(":")[-1] for m in summary["teacher"]["members"]] == ["resnet10t", "resnet18"]
    manifest = json.loads((tmp_path / "full" / "cache" / "manifest.json").read_text())
    assert set(manifest["teacher"]["outputs"]) == {"pooled_0", "pooled_1"}
    assert manifest["teacher"]["outputs"]["pooled_0"] == 512 and manifest["teacher"]["outputs"]["pooled_1"] == 512
    config = json.loads((tmp_path / "full" / "student" / "config.json").read_text())
    assert len(config["teacher"]["members"]) == 2  # the student records every teacher it learnt from

    killed = run_cli(*_args(tmp_path / "resumed", trained_teacher_file, tiny_teacher_file),
                     env={"DISTILLCTL_TEST_KILL_AT_STEP": "3"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    resumed = run_cli(*_args(tmp_path / "resumed", trained_teacher_file, tiny_teacher_file), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 2" in resumed.stderr
    for name in ("model.safetensors", "heads.safetensors"):
        expected = load_file(str(tmp_path / "full" / "student" / name))
        got = load_file(str(tmp_path / "resumed" / "student" / name))
        assert expected.keys() == got.keys() and len(expected) > 0
        assert all(expected[key].equal(got[key]) for key in expected), name


@pytest.mark.slow
def test_two_teachers_online(tmp_path, trained_teacher_file, tiny_teacher_file) -> None:
    result = run_cli(*_args(tmp_path / "run", trained_teacher_file, tiny_teacher_file, "--teacher-mode", "online",
                            "--set", "train.max_steps=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(math.isfinite(v) for v in _losses(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train"]["teacher_mode"] == "online" and not (tmp_path / "run" / "cache").exists()
    assert "cos_0" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_method_and_teacher_count_must_fit(tmp_path, tiny_teacher_file) -> None:
    base = ["--student", "tiny-cnn", "--data", "builtin:digits", "--image-size", "16", "--teacher",
            str(tiny_teacher_file), "--teacher-arch", "resnet18"]
    one = run_cli("run", "--method", "simreg", "--extra-teacher", f"{tiny_teacher_file}@resnet18", *base,
                  "--out", str(tmp_path / "one"))
    assert one.returncode == 2 and "distils one teacher" in one.stderr and "simreg-multi" in one.stderr, one.stderr
    missing = run_cli("run", "--method", "simreg-multi", *base, "--out", str(tmp_path / "missing"))
    assert missing.returncode == 2 and "teacher.extra" in missing.stderr, missing.stderr
    absent = run_cli("run", "--method", "simreg-multi", "--extra-teacher", str(tmp_path / "nope.safetensors"), *base,
                     "--out", str(tmp_path / "absent"))
    assert absent.returncode == 2 and "teacher checkpoint not found" in absent.stderr, absent.stderr
    assert not any((tmp_path / name).exists() for name in ("one", "missing", "absent"))  # nothing written


def test_catalogue_lists_the_multi_teacher_method() -> None:
    listed = run_cli("methods", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)["methods"]}
    assert rows["simreg-multi"]["teachers"] == "2+" and rows["simreg-multi"]["teacher_mode"] == "cached_exact"
    assert rows["simreg"]["teachers"] == "1" and rows["mocov2"]["teachers"] == "0"
    shown = run_cli("methods", "show", "simreg-multi")
    assert shown.returncode == 0 and "teacher.extra" in shown.stdout + shown.stderr, shown.stderr


def test_extra_teacher_flag_forms() -> None:
    from distillctl.commands import _extra_teacher, _overrides_from_flags
    from distillctl.config import load_recipe

    assert _extra_teacher("r50-barlow") == {"source": "r50-barlow"}
    assert _extra_teacher("./ckpt/r18.safetensors@resnet18") == {"source": "./ckpt/r18.safetensors", "arch": "resnet18"}
    assert _extra_teacher("./ckpt@v2/r18.pth") == {"source": "./ckpt@v2/r18.pth"}  # an @ inside the path
    overrides = _overrides_from_flags({"extra_teacher": ["r50-barlow", "a b.pth@resnet50"], "method": "simreg-multi"})
    recipe = load_recipe(None, overrides)
    assert [(e.source, e.arch) for e in recipe.teacher.extra] == [("r50-barlow", None), ("a b.pth", "resnet50")]
