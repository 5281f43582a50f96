"""MAE and MAE-lite run their own masked forwards, so the trainer runs no student forward (and for MAE-lite no
teacher forward) of its own: removing those unused passes leaves every loss and weight as it was."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from distillctl.methods import base
from distillctl.methods.base import MethodView
from distillctl.methods.mae_lite import MAE, MAELite, MAELiteParams, MAEParams
from tests.conftest import temporary_methods

VIT = ["--set", "student.kwargs.depth=2", "--set", "student.kwargs.patch_size=8", "--image-size", "32",
       "--set", "method.params.decoder_dim=32", "--set", "method.params.decoder_heads=2"]
COMMON = ["--data", "builtin:digits", "--epochs", "1", "--batch-size", "16", "--lr", "0.001",
          "--set", "train.optimizer=adamw", "--set", "data.crop_pct=1.0", "--set", "data.subset=64",
          "--set", "export.enabled=false", "--set", "train.log_every=1", "--set", "train.max_steps=3",
          "--set", "eval.random_student=false"]


def _with_trainer_forwards(requirements: base.Requirements) -> base.Requirements:
    """The requirements as they were: the view goes through the trainer's student (and, for mae-lite, teacher)."""
    teacher = requirements.teacher_mode != "none"
    return replace(requirements, views=tuple(MethodView(view.spec, teacher=teacher) for view in requirements.views),
                   teacher_outputs=frozenset({"pooled"}) if teacher else frozenset())


class _MAEWithTrainerForward(MAE):
    name = "test-mae-trainer-forward"

    def requirements(self, image_size: int) -> base.Requirements:
        return _with_trainer_forwards(super().requirements(image_size))


class _MAELiteWithTrainerForward(MAELite):
    name = "test-mae-lite-trainer-forward"

    def requirements(self, image_size: int) -> base.Requirements:
        return _with_trainer_forwards(super().requirements(image_size))


@pytest.fixture
def old_forms():
    with temporary_methods(_MAEWithTrainerForward, _MAELiteWithTrainerForward):
        yield


def test_mae_views_go_through_no_trainer_forward():
    mae = MAE(MAEParams(), 192, None).requirements(32)
    assert [(view.student, view.teacher) for view in mae.views] == [(False, False)]
    lite = MAELite(MAELiteParams(), 192, base.TeacherDims(192, backbone=torch.nn.Identity())).requirements(32)
    assert [(view.student, view.teacher) for view in lite.views] == [(False, False)]
    assert lite.teacher_mode == "online" and lite.teacher_outputs == frozenset()


def _run(args: list[str]) -> None:
    from distillctl.cli import main

    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code, f"exit {exc.code}"


def _result(out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(row["loss"], row["mae"], row.get("attn_mse")) for row in rows if row["stage"] in ("pretrain", "distill")]
    weights = {f"{name}:{key}": value for name in ("model.safetensors", "heads.safetensors")
               for key, value in load_file(str(out / "student" / name)).items()}
    return losses, weights


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mae", "mae-lite"])
def test_without_the_unused_forwards_losses_and_weights_are_unchanged(method, tmp_path, old_forms):
    if method == "mae":
        def args(name: str, out: Path) -> list[str]:
            return ["pretrain", "--method", name, "--arch", "vit_tiny_patch16_224", "--out", str(out), *COMMON, *VIT]
    else:
        torch.manual_seed(0)
        teacher = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2, patch_size=8, img_size=32)
        path = tmp_path / "vit_teacher.safetensors"
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))

        def args(name: str, out: Path) -> list[str]:
            return ["run", "--teacher", str(path), "--teacher-arch", "vit_tiny_patch16_224(depth=2, patch_size=8, img_size=32)",
                    "--student", "vit_tiny_patch16_224", "--method", name, "--out", str(out), *COMMON, *VIT,
                    "--set", "eval.teacher=false"]
    old_name = "test-mae-trainer-forward" if method == "mae" else "test-mae-lite-trainer-forward"
    _run(args(old_name, tmp_path / "old"))
    _run(args(method, tmp_path / "new"))
    (old_losses, old_weights), (new_losses, new_weights) = _result(tmp_path / "old"), _result(tmp_path / "new")
    assert len(new_losses) == 3 and new_losses == old_losses
    assert old_weights.keys() == new_weights.keys()
    assert all(torch.equal(old_weights[key], new_weights[key]) for key in old_weights)
