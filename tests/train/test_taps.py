"""Taps come from the forward that trains the network, equal what the network computes internally, and leave
no trace on the deployable student."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

import pytest

from distillctl.errors import InputError
from distillctl.taps import TapRecorder, attention_probabilities, split_tokens
from distillctl.train.loop import train
from tests.train.contract_helpers import probe_job


def _counting(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cnn_stage_maps_come_from_the_one_forward():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=0).eval()
    images = torch.randn(3, 3, 32, 32)
    stem_calls = _counting(model.conv1)
    with TapRecorder(model, ("stage:-1", "stage:2", "stage:0")) as recorder:
        pooled = model(images)
        taps = recorder.take()
    assert stem_calls[0] == 1  # no second pass
    assert pooled.equal(model(images))  # the pooled output is what the plain model returns
    # stage -1 is the map the model pools (layer4), stage 2 is layer2's output, stage 0 the stem
    assert taps["stage:-1"].equal(model.forward_features(images))
    assert torch.allclose(model.forward_head(taps["stage:-1"], pre_logits=True), pooled)
    assert taps["stage:2"].shape == (3, model.feature_info[2]["num_chs"], 4, 4)
    final, intermediates = model.forward_intermediates(images, indices=[0, 2])
    assert taps["stage:2"].equal(intermediates[1]) and taps["stage:0"].equal(intermediates[0])


def test_vit_tokens_and_attention_equal_a_manual_computation():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=0, img_size=32).eval()
    assert model.blocks[-1].attn.fused_attn  # the map is never materialised by the model itself
    images = torch.randn(2, 3, 32, 32)
    with TapRecorder(model, ("tokens", "attn:-1", "attn:0")) as recorder:
        pooled = model(images)
        taps = recorder.take()
    tokens = model.forward_features(images)
    assert taps["tokens"].equal(tokens) and pooled.equal(model(images))
    cls, registers, patches = split_tokens(model, taps["tokens"])
    assert cls.equal(tokens[:, 0]) and registers.shape[1] == 0 and patches.shape[1] == 4
    # attention of the last block, by hand: its input is the output of the blocks before it
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    for block in model.blocks[:-1]:
        x = block(x)
    attention = model.blocks[-1].attn
    h = model.blocks[-1].norm1(x)
    q, k, _ = attention.qkv(h).reshape(2, h.shape[1], 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
    manual = F.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    assert taps["attn:-1"].shape == (2, attention.num_heads, 5, 5)
    torch.testing.assert_close(taps["attn:-1"], manual, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(taps["attn:-1"].sum(-1), torch.ones(2, attention.num_heads, 5))
    # the same function on the block's own qkv output agrees exactly
    assert attention_probabilities(attention, attention.qkv(h)).equal(taps["attn:-1"])


def test_attention_tap_is_differentiable():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=0, img_size=32)
    with TapRecorder(model, ("attn:0",)) as recorder:
        model(torch.randn(2, 3, 32, 32))
        recorder.take()["attn:0"][..., 0].sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_bad_tap_names_are_one_line_input_errors():
    model = timm.create_model("test_resnet", num_classes=0)
    for tap, words in (("stage:9", "out of range"), ("attn:0", "no transformer blocks"), ("tokens", "not a timm"),
                       ("stage:x", "not an integer"), ("pixels", "unknown tap")):
        with pytest.raises(InputError, match=words):
            TapRecorder(model, (tap,))


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.slow
def test_training_with_taps_leaves_the_deployable_student_unchanged(tmp_path):
    """Train with student taps (stage map; ViT tokens + attention): the taps reach the method with the
    view's batch, and afterwards the student has no hooks and equals a fresh model with its weights."""
    for arch, taps, size in (("test_resnet", ("stage:-1",), 16), ("test_vit", ("tokens", "attn:-1"), 32)):
        job = probe_job(tmp_path / arch, student_arch=arch, image_size=size, student_taps=taps)
        job.train.max_steps = 2
        train(job)
        recorded = job.method.recorded[0]
        assert len(recorded.student_taps) == 2 and set(recorded.student_taps[0]) == set(taps)
        assert recorded.student_taps[0][taps[0]].shape[0] == 16
        assert _hooks(job.student) == 0
        fresh = timm.create_model(arch, num_classes=0, **({"img_size": size} if "vit" in arch else {}))
        fresh.load_state_dict(job.student.state_dict())
        images = torch.randn(2, 3, size, size)
        assert fresh.eval()(images).equal(job.student.eval()(images))
        import onnx

        torch.onnx.export(job.student.eval(), (images,), str(tmp_path / f"{arch}.onnx"), dynamo=False)
        graph = onnx.load(str(tmp_path / f"{arch}.onnx")).graph
        assert len(graph.output) == 1  # the pooled embedding only: no tap escaped into the exported graph
