"""MAE / MAE-lite: patchify, masking and the normalised-pixel loss against loops, the masked encoder against timm's
own forward, attention logits against q·kᵀ·scale, and pre-training / distillation + exact resume through the CLI."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from distillctl.methods.mae_lite import (MAE, MAEParams, mae_reconstruction_loss, masked_encode, patchify,
                                         random_keep, recording_attention)


def test_patchify_and_loss_match_loops():
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    for b in range(2):
        for index in range(4):
            row, col = divmod(index, 2)
            for y in range(4):
                for x in range(4):
                    for c in range(3):
                        assert patches[b, index, (y * 4 + x) * 3 + c] == images[b, c, row * 4 + y, col * 4 + x]
    prediction = torch.randn(2, 4, 48, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    total, count = 0.0, 0
    for b in range(2):
        for index in range(4):
            if mask[b, index]:
                values = patches[b, index].tolist()
                mean = sum(values) / 48
                var = sum((v - mean) ** 2 for v in values) / 47  # unbiased, as torch.var
                target = [(v - mean) / math.sqrt(var + 1e-6) for v in values]
                total += sum((p - t) ** 2 for p, t in zip(prediction[b, index].tolist(), target)) / 48
                count += 1
    assert float(mae_reconstruction_loss(prediction, patches, mask, True)) == pytest.approx(total / count, rel=1e-5)


def test_masking_is_per_step_and_keeps_a_quarter():
    method = MAE(MAEParams(), 24, None)
    method.patch = 8
    images = torch.zeros(3, 3, 32, 32)
    keep, restore, mask = method._masking(images, step=5)
    assert keep.shape == (3, 4) and mask.shape == (3, 16) and mask.sum(1).tolist() == [12.0, 12.0, 12.0]
    for b in range(3):
        assert sorted(torch.nonzero(mask[b] == 0).flatten().tolist()) == sorted(keep[b].tolist())
    again = method._masking(images, step=5)
    assert torch.equal(again[0], keep) and not torch.equal(method._masking(images, step=6)[0], keep)
    shuffle, restore2 = random_keep(3, 16, 0.75, 5, "cpu")
    assert torch.equal(torch.gather(shuffle, 1, restore2), torch.arange(16).expand(3, 16))


def test_masked_encoder_without_masking_is_timms_forward():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, embed_dim=24, depth=2, num_heads=3, patch_size=8,
                            img_size=32).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = masked_encode(vit, images, torch.arange(16).expand(2, 16))
        assert torch.allclose(ours, vit.forward_features(images), atol=1e-6)


def test_recorded_attention_is_q_k_scale_before_softmax():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, embed_dim=24, depth=1, num_heads=3, patch_size=8,
                            img_size=16).eval()
    seen = {}
    vit.blocks[0].norm1.register_forward_hook(lambda module, args, out: seen.setdefault("x", out))
    with torch.no_grad(), recording_attention(vit, -1) as recorded:
        vit(torch.randn(2, 3, 16, 16))
    weight, bias = vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.bias
    for h in range(3):
        q = seen["x"] @ weight[8 * h:8 * h + 8].T + bias[8 * h:8 * h + 8]
        k = seen["x"] @ weight[24 + 8 * h:32 + 8 * h].T + bias[24 + 8 * h:32 + 8 * h]
        assert torch.allclose(recorded["logits"][:, h], q @ k.transpose(1, 2) / math.sqrt(8), atol=1e-5)


VIT = ["--set", "student.kwargs.depth=2", "--set", "student.kwargs.patch_size=8", "--image-size", "32",
       "--set", "method.params.decoder_dim=32", "--set", "method.params.decoder_heads=2"]


@pytest.mark.slow
def test_pretrain_mae_trains_and_resumes_exactly(tmp_path) -> None:
    from safetensors.torch import load_file

    from tests.conftest import run_cli

    def args(out):
        return ["pretrain", "--method", "mae", "--arch", "vit_tiny_patch16_224", "--data", "builtin:digits",
                "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--lr", "0.001", "--out", str(out),
                "--set", "student.kwargs.depth=2", "--set", "student.kwargs.patch_size=8",
                "--set", "method.params.decoder_dim=32", "--set", "method.params.decoder_heads=2",
                "--set", "train.optimizer=adamw", "--set", "data.crop_pct=1.0", "--set", "data.subset=96",
                "--set", "export.enabled=false", "--set", "train.log_every=1", "--set", "train.checkpoint_every_steps=2",
                "--set", "train.max_steps=5"]

    full = run_cli(*args(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_cli(*args(tmp_path / "resumed"), env={"DISTILLCTL_TEST_KILL_AT_STEP": "3"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    resumed = run_cli(*args(tmp_path / "resumed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("model.safetensors", "heads.safetensors"):
        expected, got = (load_file(str(tmp_path / run / "student" / name)) for run in ("full", "resumed"))
        assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected), name


@pytest.mark.slow
def test_mae_lite_distills_and_resumes_exactly(tmp_path) -> None:
    from safetensors.torch import save_file

    from pooled_e2e import train_and_resume

    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2, patch_size=8, img_size=32)
    path = tmp_path / "mae_teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    train_and_resume(tmp_path, path, "mae-lite",
                     ["--teacher-arch", "vit_tiny_patch16_224(depth=2, patch_size=8, img_size=32)", "--student",
                      "vit_tiny_patch16_224", *VIT, "--set", "train.optimizer=adamw", "--lr", "0.001"])
