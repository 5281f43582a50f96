"""Registry data and the ``distillctl teacher`` commands (list/info/convert), plus the name
mappings used by the explicit BYOL / SimCLR conversions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from distillctl.cli import main
from distillctl.errors import InputError, UsageError
from distillctl.teachers.archs import build_head, head_output_dim, infer_head_layout, parse_arch
from distillctl.teachers.registry import load_registry

FIRST_TIER = {"mocov2-r50-800ep": ["r50-moco", "moco"], "mocov2-r50-200ep": ["r50-moco-200ep"], "swav-r50-800ep": ["r50-swav"],
              "swav-r50w2-400ep": ["r50w2-swav", "r50x2-swav"], "dino-r50": ["r50-dino"], "dino-vits16": ["vits16-dino", "vit-s-dino"],
              "dinov2-vits14": ["vits14-dinov2"], "barlowtwins-r50-1000ep": ["r50-barlow"], "vicreg-r50": ["r50-vicreg"],
              "simsiam-r50-100ep": ["r50-simsiam"]}
NEXT_TIER = ["mocov3-r50-1000ep", "mocov3-vits16-300ep", "dino-vitb16", "ibot-vits16", "ibot-vitb16", "densecl-r50-in1k-200ep",
             "mae-vitb16", "mocov1-r50-200ep"]


def run_cli(args, capsys):
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_registry_has_first_and_next_tier_with_aliases():
    registry = load_registry()
    for name, aliases in FIRST_TIER.items():
        assert set(aliases) <= set(registry.teachers[name].aliases)
        for alias in aliases:
            assert registry.resolve(alias).name == name
    assert set(NEXT_TIER) <= set(registry.teachers)
    assert registry.resolve("r50-moco").summary_line() == "mocov2-r50-800ep (MoCo v2, 800 ep, linear 71.1%)"


def test_registry_entries_are_consistent():
    import timm

    registry = load_registry()
    for entry in registry.teachers.values():
        if entry.arch.builder == "timm":
            assert entry.arch.name in timm.list_models(), entry.name
        elif entry.arch.builder == "torchvision":
            assert callable(getattr(torchvision.models, entry.arch.name)), entry.name
        if entry.head is not None:
            assert head_output_dim(entry.head.layout) == entry.head_dim, entry.name
            assert entry.head.layout.startswith(f"Linear({entry.embed_dim},"), entry.name
        assert entry.reference.source and entry.license.id, entry.name
        custom = entry.license.id.endswith("-License")  # custom terms that must be accepted (DINOv3)
        assert entry.license.requires_acceptance == ("NC" in entry.license.id or custom), entry.name
    assert registry.teachers["swav-r50w2-400ep"].arch.builder == "distillctl"
    assert registry.teachers["simclrv1-r50-1x"].preprocess.mean == (0.0, 0.0, 0.0)  # unnormalised input
    assert registry.teachers["mocov2-r50-800ep"].published_hash.md5_prefix == "a04e12f8"
    assert registry.teachers["mae-vitb16"].published_hash.md5_prefix == "8cad7c"


def test_registry_rejects_bad_entries(tmp_path, monkeypatch):
    extra = tmp_path / "extra.yaml"
    extra.write_text("version: 1\nteachers:\n  broken:\n    title: x\n    arch: {builder: timm, name: resnet18}\n    family: moco\n"
                     "    sources: [{url: 'http://x/y'}]\n    filename: y\n    embed_dim: 2\n    license: {id: MIT, commercial: true}\n"
                     "    colour: red\n")
    monkeypatch.setenv("DISTILLCTL_REGISTRY", str(extra))
    with pytest.raises(InputError, match="entry 'broken' field 'colour'"):
        load_registry()


def test_unknown_teacher_suggests_names(capsys):
    with pytest.raises(UsageError) as info:
        load_registry().resolve("r50-mocoo")
    assert "r50-moco" in info.value.hint
    code, _, err = run_cli(["teacher", "info", "r50-mocoo"], capsys)
    assert code == 2 and "did you mean" in err


def test_list_json_and_human(capsys):
    code, out, _ = run_cli(["teacher", "list", "--json"], capsys)
    rows = {row["name"]: row for row in json.loads(out)["teachers"]}
    assert code == 0 and rows["mocov2-r50-800ep"]["reference_top1"] == 71.1
    assert rows["swav-r50-800ep"]["license"] == "CC-BY-NC-4.0" and rows["swav-r50-800ep"]["license_requires_acceptance"]
    assert rows["dino-vits16"]["cached"] is False
    code, out, err = run_cli(["teacher", "list"], capsys)
    assert code == 0 and out == "" and "mocov2-r50-800ep" in err and "CC-BY-NC-4.0 [accept]" in err


def test_info_resolves_alias(capsys):
    code, out, _ = run_cli(["teacher", "info", "r50-moco", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["name"] == "mocov2-r50-800ep" and data["hash"]["state"] == "tofu-unrecorded"
    assert data["hash"]["published_md5_prefix"] == "a04e12f8"
    code, _, err = run_cli(["teacher", "info", "r50-moco"], capsys)
    assert "r50-moco → mocov2-r50-800ep (MoCo v2, 800 ep, linear 71.1%)" in err
    assert "[facebookresearch/moco:README.md]" in err


def test_convert_needs_the_optional_extra(tmp_path, capsys):
    from distillctl.teachers.external import missing_modules

    fake = tmp_path / "pretrain_res50x1.pkl"
    fake.write_bytes(b"not unpickled")
    if not missing_modules("byol"):
        pytest.skip("the byol extra is installed here")
    code, _, err = run_cli(["teacher", "convert", "byol-r50", str(fake), "--accept-license"], capsys)
    assert code == 2 and "optional 'byol' extra" in err and "pip install" in err
    code, _, err = run_cli(["teacher", "download", "byol-r50", "--accept-license"], capsys)
    assert code == 2 and "teacher convert byol-r50" in err


def test_head_layout_roundtrip():
    layout = "Linear(8,16,nobias)-BN(16)-ReLU-Linear(16,4,nobias)-BN(4,noaffine)"
    head = build_head(layout)
    assert infer_head_layout(head.state_dict()) == layout
    assert parse_arch("timm:vit_small_patch16_224(num_heads=12)").kwargs == {"num_heads": 12}
    assert parse_arch("torchvision:resnet50").builder == "torchvision"
    with pytest.raises(UsageError):
        parse_arch("timm:vit(num_heads=print(1))")


def test_wide_resnet_widen1_equals_torchvision_and_w2_widens_stem():
    from torchvision.models.resnet import Bottleneck, ResNet

    from distillctl.teachers.wide_resnet import wide_resnet

    torch.manual_seed(0)
    reference = ResNet(Bottleneck, [1, 1, 1, 1]).eval()
    ours = wide_resnet(layers=[1, 1, 1, 1], widen=1).eval()
    ours.load_state_dict(reference.state_dict())  # same key names
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(images), reference(images), atol=1e-5)
    w2 = wide_resnet(layers=[1, 1, 1, 1], widen=2, num_classes=0)
    assert w2.conv1.weight.shape[0] == 128 and w2.num_features == 4096  # not torchvision's wide_resnet50_2 (64 / 2048)


def _haiku_names(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """torchvision resnet -> the Haiku names BYOL's pickle uses (inverse of the converter's rules)."""
    import re

    out: dict[str, np.ndarray] = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        module, param = key.rsplit(".", 1)
        if module == "fc":
            out[f"classifier/~/linear/{'w' if param == 'weight' else 'b'}"] = value.t().numpy() if param == "weight" else value.numpy()
            continue
        if module in ("conv1", "bn1"):
            path = "res_net/~/initial_conv" if module == "conv1" else "res_net/~/initial_batchnorm"
        else:
            layer, block, rest = re.match(r"layer(\d)\.(\d+)\.(.*)", module).groups()
            base = f"res_net/~/block_group_{int(layer) - 1}/~/block_{block}/~/"
            rest = {"downsample.0": "shortcut_conv", "downsample.1": "shortcut_batchnorm"}.get(rest) or \
                re.sub(r"(conv|bn)(\d)", lambda m: f"{'conv' if m.group(1) == 'conv' else 'batchnorm'}_{int(m.group(2)) - 1}", rest)
            path = base + rest
        if value.dim() == 4:
            out[f"{path}/w"] = value.permute(2, 3, 1, 0).numpy()
        elif param in ("running_mean", "running_var"):
            out[f"{path}/~/{'mean_ema' if param == 'running_mean' else 'var_ema'}/average"] = value.reshape(1, 1, 1, -1).numpy()
        else:
            out[f"{path}/{'scale' if param == 'weight' else 'offset'}"] = value.reshape(1, 1, 1, -1).numpy()
    out["projector/~/linear/w"] = np.zeros((4, 4), dtype=np.float32)
    return out


def test_byol_name_mapping_rebuilds_torchvision_state():
    from distillctl.teachers.external import byol_to_torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    mapped = byol_to_torchvision(_haiku_names(model))
    state = model.state_dict()
    assert set(mapped) == set(state)
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(mapped[key], value), key


def test_simclr_creation_order_mapping():
    from distillctl.teachers.external import simclr_to_torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]

    def tf_created(names):  # TF builds a block's projection shortcut before its own convs
        ordered = []
        for name in names:
            if ".downsample." in name:
                block = name.split(".downsample.")[0]
                ordered.insert(next(i for i, n in enumerate(ordered) if n.startswith(block + ".")), name)
            else:
                ordered.append(name)
        return ordered

    state = model.state_dict()
    variables = {}
    for index, name in enumerate(tf_created(convs)):
        suffix = f"_{index}" if index else ""
        variables[f"base_model/conv2d{suffix}/kernel"] = state[f"{name}.weight"].permute(2, 3, 1, 0).numpy()
    for index, name in enumerate(tf_created(bns)):
        suffix = f"_{index}" if index else ""
        for tf_key, key in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var")):
            variables[f"base_model/batch_normalization{suffix}/{tf_key}"] = state[f"{name}.{key}"].numpy()
    mapped = simclr_to_torchvision(variables, model)
    for key, value in mapped.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key
    assert set(mapped) == set(state) - {"fc.weight", "fc.bias"}
