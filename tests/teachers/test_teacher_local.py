"""Local files and timm tags: strict plain backbones, explicit classifier stripping, family detection,
registry rules for a local copy, sidecar settings, and timm tags fetched through the mirror."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from distillctl.errors import InputError, UsageError
from distillctl.teachers import load_teacher
from teacher_helpers import torch_bytes, unused_port
from teacher_layouts import CASES


def tiny_resnet():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=0).eval()


def test_plain_safetensors_loads_strictly_with_sidecar(tmp_path, capsys):
    model = tiny_resnet()
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (tmp_path / "teacher.json").write_text(json.dumps({"arch": "test_resnet", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                                                      "input_size": [3, 64, 64]}))
    teacher = load_teacher(str(path))
    import hashlib

    assert teacher.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # the file is the converted weights
    assert teacher.preprocess.mean == (0.5, 0.5, 0.5) and teacher.preprocess.input_size == 64
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(teacher.backbone(images), model(images))
    assert "detected format plain" in capsys.readouterr().err


def test_arch_mismatch_is_input_error(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_resnet().state_dict().items()}, str(path))
    with pytest.raises(InputError, match="does not match the architecture"):
        load_teacher(str(path), arch="resnet18")
    with pytest.raises(InputError, match="not found"):
        load_teacher(str(tmp_path / "missing.safetensors"), arch="resnet18")
    with pytest.raises(UsageError, match="needs an architecture"):
        load_teacher(str(path))


def test_classifier_is_stripped_only_when_the_format_says_so(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("test_resnet", num_classes=7).eval()
    path = tmp_path / "supervised.pth"
    torch.save(full.state_dict(), path)
    with pytest.raises(InputError, match="unexpected 2 keys") as info:
        load_teacher(str(path), arch="test_resnet")
    assert "--teacher-format classifier" in info.value.hint
    teacher = load_teacher(str(path), arch="test_resnet", fmt="classifier")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher.backbone(images), full.forward_head(full.forward_features(images), pre_logits=True), atol=1e-6)


def test_local_moco_file_detected_and_converted(tmp_path, capsys):
    case = CASES["moco-v2"]()
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    path.write_bytes(torch_bytes(case.checkpoint))
    teacher = load_teacher(str(path), arch="torchvision:resnet18")
    assert "detected format moco" in capsys.readouterr().err
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (teacher.backbone(images) - case.backbone(images)).abs().max() <= 1e-5
        assert (teacher.projection(teacher.backbone(images)) - case.head(case.backbone(images))).abs().max() <= 1e-5
    assert teacher.proj_dim == 128
    with pytest.raises(InputError, match="not a swav checkpoint|structure"):
        load_teacher(str(path), arch="torchvision:resnet18", fmt="swav")


def test_local_copy_under_registry_entry_uses_its_rules(tmp_path, monkeypatch):
    """``arch`` may name a registry entry: its family, head layout and 12-head ViT apply."""
    from teacher_helpers import derive_entry, write_registry

    case = CASES["moco3-vit"]()
    path = tmp_path / "vit-s-300ep.pth.tar"
    path.write_bytes(torch_bytes(case.checkpoint))
    write_registry(tmp_path / "extra.yaml", {"small-mocov3-vit": derive_entry("mocov3-vits16-300ep", **case.overrides)}, monkeypatch)
    with pytest.raises(UsageError, match="CC-BY-NC"):
        load_teacher(str(path), arch="small-mocov3-vit")
    teacher = load_teacher(str(path), arch="small-mocov3-vit", accept_license=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (teacher.backbone(images) - case.backbone(images)).abs().max() <= 1e-5
    assert teacher.reference_top1 == 73.2 and teacher.source.startswith("local:")


def test_timm_tag_through_mirror(server, monkeypatch):
    """``timm:<model>.<tag>``: resolved via timm's pretrained cfg (HF hub file), fetched by our code."""
    from safetensors.torch import save

    torch.manual_seed(3)
    model = timm.create_model("test_vit.r160_in1k", pretrained=False).eval()  # as published: classifier included
    state = {k: v.contiguous() for k, v in model.state_dict().items()}

    server.files["/timm/test_vit.r160_in1k/resolve/main/model.safetensors"] = save(state)
    monkeypatch.setenv("DISTILLCTL_MIRROR", server.url)
    teacher = load_teacher("timm:test_vit.r160_in1k")
    images = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(images), pre_logits=True)
        assert (teacher.backbone(images) - reference).abs().max() <= 1e-5
    assert teacher.preprocess.input_size == 160 and teacher.license == "apache-2.0"


def test_timm_tag_offline_and_unknown(monkeypatch):
    monkeypatch.setenv("DISTILLCTL_MIRROR", f"http://127.0.0.1:{unused_port()}")
    with pytest.raises(InputError, match="cannot download") as info:
        load_teacher("timm:vit_small_patch16_224.dino")
    assert "teacher import" in info.value.hint
    with pytest.raises(UsageError, match="unknown timm pretrained tag"):
        load_teacher("timm:vit_small_patch16_224.nosuchtag")
    with pytest.raises(UsageError, match="cc-by-nc"):
        load_teacher("timm:vit_base_patch16_224.mae")
