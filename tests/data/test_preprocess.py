"""Preprocessing follows the teacher: its input size, crop_pct and mean/std are the run's defaults, printed and
recorded; a contradicting setting warns with both values; an input too small for the student is refused or
warned; --mean/--std/--crop-pct map to data.* keys."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from distillctl.commands import _overrides_from_flags
from distillctl.data.preprocess import (IMAGENET, TeacherPreprocessing, check_image_size, follow_teacher, from_teacher,
                                        student_stride)
from distillctl.errors import EXIT_USAGE, UsageError
from distillctl.teachers.base import Preprocess
from distillctl.teachers.resolve import _sidecar_preprocess
from tests.conftest import run_cli

CIFAR = {"arch": "resnet18", "input_size": [3, 64, 64], "resize": {"from": 32, "to": 64, "interpolation": "bilinear"},
         "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
RECIPE_DEFAULTS = {"image_size": 224, "crop_pct": 0.875, "mean": None, "std": None}


def _cifar_teacher() -> TeacherPreprocessing:
    return from_teacher(_sidecar_preprocess(CIFAR, "r18.json"), "r18")


def test_sidecar_gives_size_crop_and_normalisation():
    teacher = _cifar_teacher()
    assert (teacher.image_size, teacher.crop_pct, teacher.known) == (64, 1.0, True)
    assert teacher.mean == (0.4914, 0.4822, 0.4465) and "sidecar r18.json" in teacher.origin
    assert from_teacher(_sidecar_preprocess({"arch": "resnet18"}, "bare.json"), "bare").known is False
    registry_like = from_teacher(Preprocess(input_size=224, resize=256, origin="registry entry r50-moco"), "r50-moco")
    assert registry_like.crop_pct == 0.875 and registry_like.known
    timm_like = from_teacher(Preprocess(input_size=224, resize=248, crop_pct=0.9, origin="timm cfg"), "vit")
    assert timm_like.crop_pct == 0.9


def test_defaults_follow_the_teacher():
    choices, warnings = follow_teacher(RECIPE_DEFAULTS, set(), _cifar_teacher())
    assert warnings == []
    assert {c.key: c.value for c in choices} == {"data.image_size": 64, "data.crop_pct": 1.0,
                                                 "data.mean": [0.4914, 0.4822, 0.4465],
                                                 "data.std": [0.247, 0.2435, 0.2616]}
    assert all("sidecar r18.json" in c.reason for c in choices)


def test_contradicting_setting_warns_with_both_values():
    current = {**RECIPE_DEFAULTS, "crop_pct": 0.875, "mean": (0.485, 0.456, 0.406)}
    choices, warnings = follow_teacher(current, {"crop_pct", "mean"}, _cifar_teacher())
    assert {c.key for c in choices} == {"data.image_size", "data.std"}  # the set values are kept
    crop, mean = warnings
    assert "data.crop_pct=0.875" in crop and "crop_pct 1" in crop and "the run uses 0.875" in crop
    assert "data.mean=[0.485, 0.456, 0.406]" in mean and "[0.4914, 0.4822, 0.4465]" in mean
    agreeing = {**RECIPE_DEFAULTS, "image_size": 64, "crop_pct": 1.0}
    assert follow_teacher(agreeing, {"image_size", "crop_pct"}, _cifar_teacher())[1] == []


def test_teacher_without_stated_preprocessing_keeps_the_recipe():
    unknown = from_teacher(Preprocess(), "bare")
    choices, warnings = follow_teacher({**RECIPE_DEFAULTS, "crop_pct": 0.5}, {"crop_pct"}, unknown)
    assert warnings == []
    values = {c.key: c.value for c in choices}
    assert values["data.image_size"] == 224 and values["data.mean"] == IMAGENET["mean"]
    assert "data.crop_pct" not in values


def test_no_teacher_records_imagenet_normalisation():
    choices, warnings = follow_teacher(RECIPE_DEFAULTS, set(), None)
    assert warnings == [] and {c.key: c.value for c in choices} == {"data.mean": IMAGENET["mean"],
                                                                     "data.std": IMAGENET["std"]}


def test_image_size_against_the_students_downsampling():
    assert student_stride("mobilenetv2_100") == 32 and student_stride("vit_tiny_patch16_224") == 16
    with pytest.raises(UsageError) as refused:
        check_image_size(8, "mobilenetv2_100", 32)
    assert refused.value.exit_code == EXIT_USAGE and "downsamples 32×" in refused.value.message
    warning = check_image_size(32, "mobilenetv2_100", 32)
    assert warning and "1×1" in warning and "64 px" in warning
    assert check_image_size(64, "mobilenetv2_100", 32) is None
    assert check_image_size(16, "mobilenetv2_100", None) is None


def test_flags_map_to_data_keys():
    overrides = _overrides_from_flags({"mean": "0.49, 0.48,0.45", "std": "[0.2,0.2,0.2]", "crop_pct": 1.0})
    assert overrides["data.mean"] == [0.49, 0.48, 0.45] and overrides["data.std"] == [0.2, 0.2, 0.2]
    assert overrides["data.crop_pct"] == 1.0
    with pytest.raises(UsageError, match="--mean expects three numbers"):
        _overrides_from_flags({"mean": "red,green,blue"})


def test_too_small_image_size_is_refused_before_anything_is_written(tmp_path, tiny_teacher_file):
    out = tmp_path / "run"
    proc = run_cli("run", "--teacher", str(tiny_teacher_file), "--teacher-arch", "resnet18", "--student", "mobilenetv2",
                   "--method", "simreg", "--data", "builtin:digits", "--image-size", "8", "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "too small for the student mobilenetv2_100" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.slow
def test_run_follows_a_sidecar_and_warns_on_contradiction(tmp_path, tiny_teacher_file):
    teacher = tmp_path / "r18_16px.safetensors"
    shutil.copy(tiny_teacher_file, teacher)
    sidecar = {"arch": "resnet18", "input_size": [3, 16, 16], "resize": {"from": 8, "to": 16},
               "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    teacher.with_suffix(".json").write_text(json.dumps(sidecar))
    out = tmp_path / "run"
    proc = run_cli("run", "--teacher", str(teacher), "--student", "tiny-cnn", "--method", "simreg",
                   "--data", "builtin:digits", "--epochs", "1", "--batch-size", "64", "--crop-pct", "0.875",
                   "--out", str(out), "--set", "train.max_steps=2", "--set", "export.enabled=false",
                   "--set", "eval.teacher=false", "--set", "eval.random_student=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "preprocessing: 16 px, crop_pct 0.875, mean [0.5, 0.5, 0.5], std [0.25, 0.25, 0.25]" in text
    assert "data.crop_pct=0.875 contradicts the teacher's preprocessing: crop_pct 1" in text
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["data"]["image_size"] == 16 and recipe["data"]["mean"] == [0.5, 0.5, 0.5]
    assert recipe["data"]["crop_pct"] == 0.875
    assert recipe["derived"]["data.image_size"]["value"] == 16
    assert "sidecar r18_16px.json" in recipe["derived"]["data.std"]["reason"]
    assert "data.crop_pct" not in recipe["derived"]


def test_a_distillctl_students_config_is_its_sidecar(tmp_path, tiny_teacher_file):
    """``--teacher <run>/student/model.safetensors`` (an SSL teacher pretrained by distillctl) follows the size and
    normalisation its run used (student/config.json) and the run's crop_pct (recipe.yaml)."""
    from distillctl.teachers.resolve import load_teacher

    student = tmp_path / "run" / "student"
    student.mkdir(parents=True)
    shutil.copy(tiny_teacher_file, student / "model.safetensors")
    (student / "config.json").write_text(json.dumps({"arch": "resnet18", "num_features": 512, "input_size": [3, 32, 32],
                                                     "mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}))
    (tmp_path / "run" / "recipe.yaml").write_text("data:\n  crop_pct: 0.9\n")
    teacher = load_teacher(str(student / "model.safetensors"))  # arch from config.json
    theirs = from_teacher(teacher.preprocess, teacher.name)
    assert (theirs.image_size, theirs.crop_pct, theirs.mean, theirs.known) == (32, 0.9, (0.4, 0.4, 0.4), True)
    assert "sidecar config.json" in theirs.origin
