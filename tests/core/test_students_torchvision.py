"""torchvision students (ShuffleNetV2, SqueezeNet: the lightweight students of arXiv 2110.11160 timm lacks).

Feature dims, the embedding SqueezeNet is defined to have, the run-dir round trip through ``library``, the ONNX
parity gate, and the one-line exit-2 error for an unknown ``tv:`` name. timm students must be unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from distillctl.errors import UsageError
from distillctl.students import (StudentConfig, create_backbone, feature_dim, load_student, resolve_arch,
                                 strip_torchvision_classifier)
from tests.conftest import run_cli

SIZE = 24  # SqueezeNet 1.1 needs 17 px or more (min_input_size)


@pytest.mark.parametrize("name, arch, dim", [
    ("shufflenetv2", "tv:shufflenet_v2_x1_0", 1024),
    ("squeezenet", "tv:squeezenet1_1", 512),
    ("tv:shufflenet_v2_x0_5", "tv:shufflenet_v2_x0_5", 1024),
    ("torchvision:squeezenet1_0", "tv:squeezenet1_0", 512),
    ("tv:resnet18", "tv:resnet18", 512),
    ("tv:mobilenet_v2", "tv:mobilenet_v2", 1280),
])
def test_feature_dims_and_pooled_output(name: str, arch: str, dim: int) -> None:
    assert resolve_arch(name) == arch
    torch.manual_seed(0)
    model = create_backbone(name).eval()
    assert feature_dim(model) == dim
    with torch.no_grad():
        out = model(torch.randn(3, 3, SIZE, SIZE))
    assert tuple(out.shape) == (3, dim)


def test_squeezenet_embedding_is_global_average_of_features() -> None:
    torch.manual_seed(0)
    model = create_backbone("squeezenet").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.features(images).mean(dim=(2, 3))
        np.testing.assert_allclose(model(images).numpy(), expected.numpy(), atol=1e-6, rtol=0)
    assert not any(key.startswith("classifier") for key in model.state_dict())  # no parameters in the pooling


def test_squeezenet_too_small_is_refused_up_front(tmp_path: Path) -> None:
    result = run_cli("pretrain", "--arch", "squeezenet", "--image-size", "16", "--data", "builtin:digits",
                     "--epochs", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "at least 17 px" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_state_dict_keys_are_torchvisions_minus_the_classifier() -> None:
    import torchvision

    full = torchvision.models.get_model("shufflenet_v2_x1_0", weights=None).state_dict()
    ours = create_backbone("shufflenetv2").state_dict()
    assert set(full) - set(ours) == {"fc.weight", "fc.bias"} and set(ours) <= set(full)


def test_timm_students_unchanged() -> None:
    assert resolve_arch("mobilenetv2") == "mobilenetv2_100" and resolve_arch("efficientnet-lite0") == "efficientnet_lite0"
    assert StudentConfig(arch="resnet18", num_features=512, input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3,
                         teacher={}, method="byol").library == "timm"


def _write_student(root: Path, arch: str, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = create_backbone(arch).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    run = root / "run"
    (run / "student").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "student" / "model.safetensors"))
    config = StudentConfig(arch=resolve_arch(arch), num_features=feature_dim(model), input_size=[3, SIZE, SIZE],
                           mean=[0.5] * 3, std=[0.25] * 3, teacher={}, method="byol")
    (run / "student" / "config.json").write_text(config.to_json())
    (run / "summary.json").write_text(json.dumps({"method": "byol", "student": {"arch": config.arch}}))
    return run, model


@pytest.mark.parametrize("arch", ["shufflenetv2", "squeezenet"])
def test_run_dir_round_trip_records_the_library(tmp_path: Path, arch: str) -> None:
    import torchvision
    from safetensors.torch import load_file

    run, model = _write_student(tmp_path, arch)
    recorded = json.loads((run / "student" / "config.json").read_text())
    assert recorded["library"] == "torchvision" and recorded["arch"] == resolve_arch(arch)
    loaded, config = load_student(run)
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(images)
        assert torch.equal(loaded(images), reference)
    # the documented contract, without distillctl's loader: torchvision + the classifier removal + strict load
    name = recorded["arch"].split(":", 1)[1]
    rebuilt = strip_torchvision_classifier(torchvision.models.get_model(name, weights=None), recorded["arch"])
    rebuilt.load_state_dict(load_file(str(run / "student" / "model.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images), reference)


def test_config_library_must_match_the_arch() -> None:
    common = dict(num_features=512, input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3, teacher={}, method="byol")
    assert StudentConfig(arch="squeezenet1_1", library="torchvision", **common).arch == "tv:squeezenet1_1"
    with pytest.raises(ValueError, match="does not build"):
        StudentConfig(arch="tv:squeezenet1_1", library="timm", **common)


@pytest.mark.slow
@pytest.mark.parametrize("arch, formats", [("squeezenet", ["onnx", "onnx-int8"]), ("shufflenetv2", ["onnx"])])
def test_onnx_and_int8_export_of_a_torchvision_student(tmp_path: Path, arch: str, formats: list[str]) -> None:
    from distillctl.export.api import export_config, export_run

    run, _ = _write_student(tmp_path, arch)
    # random weights: the INT8 kNN budget is not what this test is about (the export tests check the gate)
    report = export_run(run, export_config(formats, parity_images=8, calib_size=32, max_drop=100.0), data="builtin:digits")
    parity = report["onnx"]["parity"]
    assert report["passed"] and parity["passed"] and parity["images"] == 8
    assert parity["max_abs"] <= 1e-4 * max(1.0, parity["ref_abs_max"]) and parity["min_cosine"] >= 0.99999
    assert (run / "export" / "student.onnx").is_file()
    if "onnx-int8" in formats:
        assert report["onnx-int8"]["parity"]["passed"] and (run / report["onnx-int8"]["path"]).is_file()
    card = json.loads((run / "export" / "model_card.json").read_text())
    assert card["student"]["arch"] == resolve_arch(arch) and "torchvision" in card["export"]["versions"]


def test_unknown_torchvision_name() -> None:
    with pytest.raises(UsageError, match="unknown torchvision student architecture 'tv:shufflenet_v9'") as info:
        resolve_arch("tv:shufflenet_v9")
    assert "tv:shufflenet_v2" in (info.value.hint or "")
    with pytest.raises(UsageError):
        resolve_arch("tv:vit_b_16")  # a fixed-grid torchvision model is refused as a student


def test_unknown_torchvision_name_cli_exit_2(tmp_path: Path) -> None:
    result = run_cli("pretrain", "--arch", "tv:squeezenet9", "--data", "builtin:digits", "--epochs", "1",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown torchvision student architecture 'tv:squeezenet9'" in errors[0]
    assert not (tmp_path / "run").exists()


def test_a_feature_map_method_on_a_torchvision_student_exits_2_before_writing(tiny_teacher_file: Path,
                                                                              tmp_path: Path) -> None:
    """pcd taps the student's last feature stage, which only timm models describe: refused before the run
    directory exists (it used to be written first: manifest, recipe, summary)."""
    result = run_cli("run", "--method", "pcd", "--student", "shufflenetv2", "--teacher", str(tiny_teacher_file),
                     "--teacher-arch", "resnet18", "--data", "builtin:digits", "--image-size", "32", "--epochs", "1",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "method pcd, student shufflenetv2: tap 'stage:-1'" in errors[0]
    assert not (tmp_path / "run").exists()
