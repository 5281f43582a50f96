"""DINOv3 teachers: an official-layout checkpoint (facebookresearch/dinov3 key names, random weights) converts to the
timm model whose output equals an independent forward of the official architecture written here from its definition."""

from __future__ import annotations

import pytest
import torch

from distillctl.teachers.registry import load_registry
from distillctl.teachers.resolve import _convert_entry_file
from dinov3_reference import (official_convnext_pooled, official_convnext_state, official_vit_cls,
                              official_vit_state)
from tests.conftest import run_cli


def _convert(name: str, state: dict, tmp_path):
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    return _convert_entry_file(load_registry().resolve(name), path)


def test_dinov3_vits16_official_layout_converts_exactly(tmp_path):
    state = official_vit_state(384, 12, 6, torch.Generator().manual_seed(0))
    backbone, head, converted = _convert("dinov3-vits16", state, tmp_path)
    assert head is None and converted.dropped == {"mask_token": 1, "rope_embed.periods": 1}
    images = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ours = backbone.double().eval()(images)
    reference = official_vit_cls(state, images, heads=6)
    assert ours.shape == (2, 384)
    # RoPE sin/cos are built in float32 (upstream's pos_embed_rope_dtype fp32, and timm): ~1e-8 of the output
    # scale; a wrong key, bias or norm shows up as 1e-2 and more
    assert (ours - reference).abs().max() <= 1e-6 * reference.abs().max(), (ours - reference).abs().max()


def test_dinov3_key_bias_mask_and_rope_periods_are_checked(tmp_path):
    from distillctl.errors import InputError

    state = official_vit_state(384, 12, 6, torch.Generator().manual_seed(0))
    state["blocks.3.attn.qkv.bias_mask"] = torch.ones(3 * 384)  # a key bias that would be applied upstream
    with pytest.raises(InputError, match="key-bias mask"):
        _convert("dinov3-vits16", state, tmp_path)
    state = official_vit_state(384, 12, 6, torch.Generator().manual_seed(0))
    state["rope_embed.periods"] = state["rope_embed.periods"] * 2
    with pytest.raises(InputError, match="base-100"):
        _convert("dinov3-vits16", state, tmp_path)


def test_dinov3_convnext_tiny_official_layout_converts_exactly(tmp_path):
    depths, dims = (3, 3, 9, 3), (96, 192, 384, 768)
    state = official_convnext_state(depths, dims, torch.Generator().manual_seed(0))
    backbone, _, converted = _convert("dinov3-convnext-tiny", state, tmp_path)
    assert converted.dropped == {"norms.": 2}
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ours = backbone.double().eval()(images)
    reference = official_convnext_pooled(state, images, depths)
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-9), (ours - reference).abs().max()


def test_dinov3_registry_entries_are_licence_gated_and_hash_prefixed(tmp_path):
    registry = load_registry()
    for name in ("dinov3-vits16", "dinov3-vitb16", "dinov3-vitl16", "dinov3-convnext-tiny", "dinov3-convnext-small",
                 "dinov3-convnext-base", "dinov3-convnext-large"):
        entry = registry.resolve(name)
        assert entry.license.requires_acceptance and entry.family == "dinov3"
        assert entry.filename.endswith(f"-{entry.published_hash.sha256_prefix}.pth")
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(official_vit_state(384, 12, 6, torch.Generator().manual_seed(0)), path)
    home = {"DISTILLCTL_HOME": str(tmp_path / "home")}
    refused = run_cli("teacher", "import", "dinov3-vits16", str(path), env=home)
    assert refused.returncode == 2 and "--accept-license" in refused.stderr
    mismatch = run_cli("teacher", "import", "dinov3-vits16", str(path), "--accept-license", env=home)
    # random weights cannot start with the published sha256 prefix: exit 3, nothing stored
    assert mismatch.returncode == 3 and "published prefix 08c60483" in mismatch.stderr, mismatch.stderr
    assert not (tmp_path / "home" / "teachers" / "dinov3-vits16" / "meta.json").exists()
