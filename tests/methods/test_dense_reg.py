"""dense-reg: the per-location loss against loops, maps from CNN stages and ViT tokens, and training + exact resume."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distillctl.methods.base import MethodInputs, TeacherDims
from distillctl.methods.dense_common import as_map, map_geometry
from distillctl.methods.dense_reg import DenseRegParams, DenseRegression, dense_regression_loss


def test_loss_matches_a_per_location_loop():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 4, 2, generator=generator), torch.randn(3, 5, 4, 2, generator=generator)
    cosine_terms, squared = [], []
    for b in range(3):
        for y in range(4):
            for x in range(2):
                s, t = student[b, :, y, x], teacher[b, :, y, x]
                cosine_terms.append(2 - 2 * float(s @ t) / (float(s.norm()) * float(t.norm())))
                squared.extend(float(v) ** 2 for v in (s - t))
    assert float(dense_regression_loss(student, teacher, "cosine")) == pytest.approx(sum(cosine_terms) / len(cosine_terms))
    assert float(dense_regression_loss(student, teacher, "mse")) == pytest.approx(sum(squared) / len(squared))


def test_vit_tokens_become_a_patch_grid_without_prefix_tokens():
    tokens = torch.arange(2 * (5 + 9) * 3, dtype=torch.float32).view(2, 14, 3)  # CLS + 4 registers + 3x3 patches
    grid = as_map(tokens, prefix_tokens=5)
    assert grid.shape == (2, 3, 3, 3)
    for y in range(3):
        for x in range(3):
            assert torch.equal(grid[:, :, y, x], tokens[:, 5 + 3 * y + x])
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2, img_size=32, patch_size=8, reg_tokens=4)
    assert map_geometry(vit, "stage:-1").channels == 192 and map_geometry(vit, "stage:-1").prefix_tokens == 5


def test_method_resizes_then_projects_the_student_map():
    cnn = SimpleNamespace(feature_info=[{"module": "x", "num_chs": 6, "reduction": 1}])
    teacher = SimpleNamespace(feature_info=[{"module": "y", "num_chs": 4, "reduction": 1}])
    method = DenseRegression(DenseRegParams(), 8, TeacherDims(pooled=9, backbone=teacher))
    method.setup(cnn)
    generator = torch.Generator().manual_seed(1)
    student_map, teacher_map = torch.randn(2, 6, 2, 2, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)
    inputs = MethodInputs(student_features=[torch.zeros(2, 8)], teacher_outputs=[{"stage:-1": teacher_map}],
                          images=[torch.zeros(2, 3, 8, 8)], index=torch.arange(2), epoch=0.0, step=0, total_epochs=1,
                          student_taps=[{"stage:-1": student_map}])
    loss, logs = method.loss(inputs)
    resized = F.interpolate(student_map, size=(4, 4), mode="bilinear", align_corners=False)
    weight, bias = method.projector.weight[:, :, 0, 0], method.projector.bias
    projected = torch.einsum("oc,bchw->bohw", weight, resized) + bias[None, :, None, None]
    assert torch.allclose(loss, dense_regression_loss(projected, teacher_map, "cosine"), atol=1e-6)
    assert logs["cos"] == pytest.approx(float(F.cosine_similarity(projected, teacher_map, dim=1).mean().detach()), abs=1e-6)
    req = method.requirements(16)
    assert req.student_taps == ("stage:-1",) and req.teacher_taps == ("stage:-1",) and req.teacher_mode == "cached_exact"


@pytest.mark.slow
def test_trains_and_resumes_exactly(tmp_path, tiny_teacher_file) -> None:
    from pooled_e2e import train_and_resume

    train_and_resume(tmp_path, tiny_teacher_file, "dense-reg",
                     ["--image-size", "32", "--set", "method.params.student_tap=stage:-2",
                      "--set", "method.params.teacher_tap=stage:-2"])


@pytest.mark.slow
def test_vit_student_from_cnn_teacher(tmp_path, tiny_teacher_file) -> None:
    from pooled_e2e import losses_of
    from tests.conftest import run_cli

    out = tmp_path / "vit"
    result = run_cli("run", "--teacher", str(tiny_teacher_file), "--teacher-arch", "resnet18", "--student",
                     "vit_tiny_patch16_224", "--method", "dense-reg", "--data", "builtin:digits", "--image-size", "32",
                     "--epochs", "1", "--batch-size", "16", "--out", str(out), "--set", "student.kwargs.depth=2",
                     "--set", "student.kwargs.patch_size=8", "--set", "method.params.teacher_tap=stage:-2",
                     "--set", "data.subset=96", "--set", "train.max_steps=4", "--set", "export.enabled=false",
                     "--set", "eval.teacher=false", "--set", "train.log_every=1")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = losses_of(out)
    assert len(losses) == 4 and losses[-1] < losses[0], losses
