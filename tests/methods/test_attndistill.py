"""AttnDistill: attention tap = softmax(QKᵀ/√d) of a timm block, each loss piece against a loop, the projector
layout, head-count handling, and training + exact resume (ViT teacher → ViT student) through the CLI."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from distillctl.errors import UsageError
from distillctl.methods.attndistill import (AttnDistill, AttnDistillParams, aggregate_heads, attention_kl,
                                            resize_patch_attention, student_projector)
from distillctl.methods.base import TeacherDims
from distillctl.taps import TapRecorder


def test_attention_tap_is_softmax_qk_over_sqrt_d_of_the_block():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, embed_dim=24, depth=2, num_heads=3, patch_size=8,
                            img_size=16).eval()
    images = torch.randn(2, 3, 16, 16)
    seen = {}
    vit.blocks[-1].norm1.register_forward_hook(lambda module, args, out: seen.setdefault("x", out))
    with torch.no_grad(), TapRecorder(vit, ("attn:-1",)) as recorder:
        vit(images)
        tap = recorder.take()["attn:-1"]
    x, attention = seen["x"], vit.blocks[-1].attn
    weight, bias = attention.qkv.weight, attention.qkv.bias
    for b in range(2):
        for h in range(3):
            rows = slice(8 * h, 8 * h + 8)
            q = x[b] @ weight[rows].T + bias[rows]
            k = x[b] @ weight[24:48][rows].T + bias[24:48][rows]
            manual = torch.softmax(q @ k.T / math.sqrt(8), dim=-1)
            assert torch.allclose(tap[b, h], manual, atol=1e-6)


def test_kl_and_aggregation_match_loops():
    generator = torch.Generator().manual_seed(0)
    student = torch.softmax(torch.randn(3, 2, 5, generator=generator) * 3, -1)
    teacher = torch.softmax(torch.randn(3, 2, 5, generator=generator) * 3, -1)
    total = 0.0
    for b in range(3):
        for h in range(2):
            s = [min(max(v, 1e-5), 0.996) for v in student[b, h].tolist()]
            t = [min(max(v, 1e-5), 0.996) for v in teacher[b, h].tolist()]
            s, t = [v / sum(s) for v in s], [v / sum(t) for v in t]
            total += sum(tv * (math.log(tv) - math.log(sv)) for sv, tv in zip(s, t))
    assert float(attention_kl(student, teacher)) == pytest.approx(total / 3, rel=1e-5)
    aggregated = aggregate_heads(teacher, 10.0)
    for b in range(3):
        logits = [sum(math.log(float(teacher[b, h, n])) for h in range(2)) / 10.0 for n in range(5)]
        expected = [math.exp(v) / sum(math.exp(u) for u in logits) for v in logits]
        assert aggregated[b].tolist() == pytest.approx(expected, rel=1e-5)


def test_resized_teacher_attention_keeps_cls_and_patch_mass():
    attention = torch.softmax(torch.randn(2, 3, 1 + 16, generator=torch.Generator().manual_seed(1)) * 0.3, -1)
    resized = resize_patch_attention(attention, 2)
    assert resized.shape == (2, 3, 5)
    assert torch.equal(resized[:, :, 0], attention[:, :, 0])
    assert torch.allclose(resized.sum(-1), torch.ones(2, 3), atol=1e-6)
    same = resize_patch_attention(attention, 4)  # an equal grid is the identity (the official --interpolate)
    assert torch.allclose(same, attention, atol=1e-6)


def test_projector_layout_is_the_official_one():
    projector = student_projector(192, 384, 4)
    kinds = [type(m).__name__ for m in projector]
    assert kinds == ["LayerNorm", "Linear", "GELU", "Linear", "GELU", "Linear", "GELU", "Linear"]
    shapes = [(m.in_features, m.out_features) for m in projector if isinstance(m, nn.Linear)]
    assert shapes == [(192, 384), (384, 192), (192, 384), (384, 384)]


def test_head_counts_must_match_unless_aggregated():
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=0, embed_dim=24, depth=1, num_heads=4)
    student = timm.create_model("vit_tiny_patch16_224", num_classes=0, embed_dim=12, depth=1, num_heads=2)
    method = AttnDistill(AttnDistillParams(), 12, TeacherDims(24, backbone=teacher))
    with pytest.raises(UsageError, match="4 heads, the student 2") as raised:
        method.setup(student)
    assert "head_aggregation=true" in raised.value.hint
    AttnDistill(AttnDistillParams(head_aggregation=True), 12, TeacherDims(24, backbone=teacher)).setup(student)
    with pytest.raises(UsageError, match="ViT student"):
        AttnDistill(AttnDistillParams(), 12, TeacherDims(24, backbone=teacher)).setup(timm.create_model("resnet18"))


def test_recipes_validate():
    from pooled_e2e import check_recipes

    check_recipes("attndistill", spells_defaults=False)
    check_recipes("dense-reg", spells_defaults=False)
    check_recipes("pcd", spells_defaults=False)
    check_recipes("mae-lite", spells_defaults=False)


@pytest.mark.slow
def test_trains_and_resumes_exactly(tmp_path) -> None:
    from safetensors.torch import save_file

    from pooled_e2e import train_and_resume

    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2)
    path = tmp_path / "vit_teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    train_and_resume(tmp_path, path, "attndistill",
                     ["--teacher-arch", "vit_tiny_patch16_224(depth=2)", "--student", "vit_tiny_patch16_224",
                      "--image-size", "32", "--set", "student.kwargs.depth=1", "--set", "student.kwargs.patch_size=8",
                      "--set", "train.optimizer=adamw", "--lr", "0.001"])
