"""Every converter family, end to end: a checkpoint in the family's on-disk layout is served over
HTTP on 127.0.0.1, downloaded through the real code, converted, and must reproduce the reference
model's backbone and head outputs."""

from __future__ import annotations

import hashlib

import pytest
import torch

from distillctl.errors import InputError
from distillctl.teachers import load_teacher
from distillctl.teachers.convert import CONVERTERS
from teacher_helpers import derive_entry, torch_bytes, write_registry
from teacher_layouts import CASE_FAMILIES, CASES, Case

TOL = 1e-5


def serve_case(case_id: str, case: Case, server, tmp_path, monkeypatch, **extra) -> str:
    """Serve the case's checkpoint and register an entry for it; returns the entry name."""
    payload = torch_bytes(case.checkpoint)
    path = f"/{case_id}/{derive_entry(case.base)['filename']}"
    server.files[path] = payload
    overrides = dict(case.overrides, sources=[{"url": server.url + path}])
    if derive_entry(case.base).get("published_hash") and "published_hash" not in case.overrides:  # keep the md5-prefix check live with the real digest
        overrides["published_hash"] = {"md5_prefix": hashlib.md5(payload).hexdigest()[:8]}
    overrides.update(extra)
    name = f"test-{case_id}"
    write_registry(tmp_path / "extra.yaml", {name: derive_entry(case.base, **overrides)}, monkeypatch)
    return name


def test_every_converter_family_has_a_case():
    assert set(CASE_FAMILIES.values()) == set(CONVERTERS)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_family_converts_exactly(case_id, server, tmp_path, monkeypatch):
    case = CASES[case_id]()
    name = serve_case(case_id, case, server, tmp_path, monkeypatch)
    teacher = load_teacher(name, accept_license=True)
    images = torch.randn(3, 3, case.input_size, case.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = case.backbone(images)
        out = teacher.forward(images, {"pooled", "proj"} if case.head is not None else {"pooled"})
    assert out["pooled"].shape == expected.shape
    assert (out["pooled"] - expected).abs().max().item() <= TOL
    if case.head is not None:
        with torch.no_grad():
            expected_proj = case.head(expected)
        assert teacher.proj_dim == expected_proj.shape[1]
        assert (out["proj"] - expected_proj).abs().max().item() <= TOL
    else:
        assert teacher.projection is None
    # The converted store is what later loads read: same identity, same features, no new request.
    requests = len(server.requests)
    again = load_teacher(name, accept_license=True)
    assert again.sha256 == teacher.sha256 and len(server.requests) == requests
    with torch.no_grad():
        assert torch.equal(again.backbone(images), out["pooled"])


MOCO_V2_SMALL = {"arch": {"builder": "torchvision", "name": "resnet18", "kwargs": {}}, "embed_dim": 512,
                 "head": {"layout": "Linear(512,512)-ReLU-Linear(512,128)"}, "head_dim": 128, "published_hash": None}


def test_swav_file_under_moco_entry_is_rejected(server, tmp_path, monkeypatch):
    wrong = CASES["swav"]()
    wrong.base, wrong.overrides = "mocov2-r50-800ep", MOCO_V2_SMALL  # a SwAV file behind a MoCo name
    name = serve_case("wrong", wrong, server, tmp_path, monkeypatch)
    with pytest.raises(InputError, match="not a moco checkpoint.*looks like: swav"):
        load_teacher(name)
    folder = tmp_path / "home" / "teachers" / name
    assert not (folder / "moco_v2_800ep_pretrain.pth.tar").exists()  # not kept as valid
    assert (folder / "moco_v2_800ep_pretrain.pth.tar.rejected").exists()
    assert not (folder / "meta.json").exists()
    lock = tmp_path / "home" / "lock.json"
    assert not lock.exists() or name not in lock.read_text()


def test_moco_v1_file_under_v2_entry_fails_head_check(server, tmp_path, monkeypatch):
    v1 = CASES["moco-v1"]()
    v1.base, v1.overrides = "mocov2-r50-800ep", MOCO_V2_SMALL
    name = serve_case("v1-as-v2", v1, server, tmp_path, monkeypatch)
    with pytest.raises(InputError, match=r"projection head is Linear\(512,128\), expected"):
        load_teacher(name)


def test_mocov3_vit_small_needs_12_heads(server, tmp_path, monkeypatch):
    """Weight shapes do not depend on the head count: a 6-head build loads silently and is wrong."""
    from distillctl.teachers.registry import load_registry

    assert load_registry().teachers["mocov3-vits16-300ep"].arch.kwargs == {"num_heads": 12}
    assert "num_heads" not in load_registry().teachers["dino-vits16"].arch.kwargs  # DINO ViT-S: 6, timm default
    case = CASES["moco3-vit"]()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = case.backbone(images)
    name = serve_case("heads12", case, server, tmp_path, monkeypatch)
    right = load_teacher(name, accept_license=True)
    wrong_arch = dict(case.overrides["arch"], kwargs=dict(case.overrides["arch"]["kwargs"], num_heads=6))
    name6 = serve_case("heads6", case, server, tmp_path, monkeypatch, arch=wrong_arch)
    wrong = load_teacher(name6, accept_license=True)
    with torch.no_grad():
        assert (right.backbone(images) - reference).abs().max().item() <= TOL
        assert (wrong.backbone(images) - reference).abs().max().item() > 1e-2


def test_dinov2_registers_and_resample_match_timm(tmp_path):
    """Registers fold like timm's own filter; a pos-embed stored for a bigger grid is resampled once,
    giving the same model as timm's ``checkpoint_filter_fn`` (an independent conversion path)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    from teacher_helpers import vit_tiny

    reference = vit_tiny("vit_small_patch14_reg4_dinov2", seed=3, img_size=56)
    state = dict(reference.state_dict())
    cls_pos = torch.randn(1, 1, 48)
    dinov2_layout = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    dinov2_layout |= {"register_tokens": state["reg_token"], "cls_token": state["cls_token"] - cls_pos,
                      "pos_embed": torch.cat([cls_pos, state["pos_embed"]], dim=1), "mask_token": torch.zeros(1, 48)}
    path = tmp_path / "dinov2_reg.pth"
    torch.save(dinov2_layout, path)
    images = torch.randn(2, 3, 56, 56)
    native = load_teacher(str(path), arch="vit_small_patch14_reg4_dinov2(img_size=56,depth=2,embed_dim=48,num_heads=6)", fmt="dinov2")
    with torch.no_grad():
        assert (native.backbone(images) - reference(images)).abs().max().item() <= TOL
    small = load_teacher(str(path), arch="vit_small_patch14_reg4_dinov2(img_size=28,depth=2,embed_dim=48,num_heads=6)", fmt="dinov2")
    via_timm = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=28, depth=2, embed_dim=48, num_heads=6, num_classes=0)
    via_timm.load_state_dict(checkpoint_filter_fn(dict(dinov2_layout), via_timm))
    images28 = images[:, :, :28, :28]
    with torch.no_grad():
        assert (small.backbone(images28) - via_timm.eval()(images28)).abs().max().item() <= TOL


def test_dino_full_checkpoint_teacher_container_and_pickled_args(tmp_path):
    import argparse

    case = CASES["dino"]()
    full = {"teacher": {f"backbone.{k}": v for k, v in case.backbone.state_dict().items()} | {"head.mlp.0.weight": torch.randn(8, 48)},
            "student": {}, "epoch": 100}
    path = tmp_path / "dino_full.pth"
    torch.save(full, path)
    teacher = load_teacher(str(path), arch="vit_small_patch16_224(img_size=32,depth=2,embed_dim=48)")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (teacher.backbone(images) - case.backbone(images)).abs().max().item() <= TOL
    full["args"] = argparse.Namespace(arch="vit_small")  # the real full checkpoints pickle this
    torch.save(full, path)
    with pytest.raises(InputError, match="weights_only"):
        load_teacher(str(path), arch="vit_small_patch16_224(img_size=32,depth=2,embed_dim=48)")
