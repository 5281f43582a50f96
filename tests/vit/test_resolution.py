"""ViT students and teachers at any input size: position embeddings adapt (recorded) or the size is refused (exit 2)."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from distillctl.errors import UsageError
from distillctl.resolution import adapt_to_size, check_patch_multiple, patch_grid, student_model_kwargs
from tests.conftest import run_cli


def test_teacher_pos_embed_resampled_like_timm_and_recorded():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1).eval()  # a 14x14 grid
    original = model.pos_embed.detach().clone()
    record = adapt_to_size(model, 32, "teacher test")
    from timm.layers import resample_abs_pos_embed

    expected = resample_abs_pos_embed(original, new_size=[2, 2], old_size=[14, 14], num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=True)
    assert model.pos_embed.shape == (1, 1 + 4, 192)
    assert torch.equal(model.pos_embed.detach(), expected)
    assert torch.equal(model.pos_embed[:, 0], original[:, 0])  # the CLS position is kept as it was
    assert record == {"trained_size": 224, "input_size": 32, "patch_size": 16, "grid": "14x14 -> 2x2",
                      "pos_embed": "resampled once (timm set_input_size: bicubic, antialias)"}
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    dynamic = timm.create_model("test_vit", num_classes=0)  # built with dynamic_img_size: any multiple of 16 runs
    assert adapt_to_size(dynamic, 32, "teacher") is None and dynamic(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    assert adapt_to_size(model, 32, "teacher test") is None  # already there: nothing to record
    assert adapt_to_size(timm.create_model("resnet18", num_classes=0), 32, "cnn") is None


def test_size_not_a_multiple_of_the_patch_is_refused_with_a_hint():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1, patch_size=8, img_size=32)
    with pytest.raises(UsageError) as raised:
        check_patch_multiple(patch_grid(model), [36], "student test_vit")
    assert raised.value.exit_code == 2
    assert "not a multiple of 8" in raised.value.message and "--image-size 32 or 40" in raised.value.hint
    with pytest.raises(UsageError):
        adapt_to_size(model, 20, "teacher")


def test_student_kwargs_follow_the_views():
    assert student_model_kwargs("resnet18", 32) == {}
    assert student_model_kwargs("vit_tiny_patch16_224", 64) == {"img_size": 64}
    assert student_model_kwargs("vit_tiny_patch16_224", 32, [32, 16], {"patch_size": 8}) == \
        {"patch_size": 8, "img_size": 32, "dynamic_img_size": True}
    # the recorded keywords rebuild the same architecture with plain timm
    kwargs = student_model_kwargs("vit_tiny_patch16_224", 32, [], {"patch_size": 8, "depth": 1})
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs)
    assert patch_grid(model).grid == (4, 4)


def _vit_teacher(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2)  # built for 224 px
    path = tmp_path / "vit_teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    return path


def _vit_run(teacher, out, size, *extra):
    return ["run", "--teacher", str(teacher), "--teacher-arch", "vit_tiny_patch16_224(depth=2)",
            "--student", "vit_tiny_patch16_224",
            "--method", "simreg", "--data", "builtin:digits", "--image-size", str(size), "--epochs", "1",
            "--batch-size", "64", "--out", str(out), "--set", "student.kwargs.patch_size=8",
            "--set", "student.kwargs.depth=2", "--set", "data.crop_pct=1.0", "--set", "train.max_steps=6",
            "--set", "eval.teacher=false", "--set", "eval.random_student=false", "--set", "train.log_every=3", *extra]


@pytest.mark.slow
def test_vit_student_and_teacher_at_32px_train_export_quantise(tmp_path):
    teacher = _vit_teacher(tmp_path)
    out = tmp_path / "run"
    result = run_cli(*_vit_run(teacher, out, 32, "--set", "export.enabled=false"))
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert "position embeddings resampled 14x14 -> 2x2 for 32 px inputs" in result.stderr.replace("\n", " ")
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["model_kwargs"] == {"patch_size": 8, "depth": 2, "img_size": 32}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["resolution"]["grid"] == "14x14 -> 2x2"

    exported = run_cli("export", str(out), "--format", "onnx,onnx-int8", "--calib-size", "64", "--json")
    assert exported.returncode == 0, exported.stderr[-2000:]
    # the contract: plain timm + the recorded keywords reproduce the embedding the ONNX file computes
    from safetensors.torch import load_file

    from distillctl.export.onnx import ort_session

    model = timm.create_model(config["arch"], num_classes=0, **config["model_kwargs"]).eval()
    model.load_state_dict(load_file(str(out / "student" / "model.safetensors")), strict=True)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = model(images).numpy()
    onnx_out = ort_session(out / "export" / "student.onnx").run(None, {"input": images.numpy()})[0]
    assert abs(onnx_out - reference).max() < 1e-4
    report = json.loads((out / "summary.json").read_text())["export"]
    text = json.dumps(report)
    assert "student.int8.onnx" in text and '"passed": false' not in text
    assert "[1, 3, 32]" in text.replace("\n", "").replace("  ", "") or "1/3/32" in text


@pytest.mark.slow
def test_sizes_off_the_patch_grid_exit_2_before_training(tmp_path, tiny_teacher_file):
    teacher = _vit_teacher(tmp_path)
    result = run_cli(*_vit_run(teacher, tmp_path / "bad", 36))
    assert result.returncode == 2, result.stderr[-1500:]
    assert "teacher vit_teacher" in result.stderr and "not a multiple of 16" in result.stderr
    assert "--image-size 32 or 48" in result.stderr
    args = _vit_run(tiny_teacher_file, tmp_path / "bad2", 36)
    args[args.index("vit_tiny_patch16_224(depth=2)")] = "resnet18"
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-1500:]
    assert "student vit_tiny_patch16_224" in result.stderr and "--image-size 32 or 40" in result.stderr
    assert not (tmp_path / "bad2" / "student").exists()
