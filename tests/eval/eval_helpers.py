"""Helpers for the eval tests: save a tiny timm student in the run layout, export it to ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import torch

MEAN = [0.5, 0.5, 0.5]
STD = [0.25, 0.25, 0.25]


def save_student(run_dir: Path, seed: int = 0, arch: str = "test_resnet") -> torch.nn.Module:
    """Write ``<run_dir>/student/{model.safetensors,config.json}`` for a randomly initialised timm model."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=0, pretrained=False).eval()
    student = run_dir / "student"
    student.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(student / "model.safetensors"))
    config = {"arch": arch, "num_features": model.num_features, "input_size": [3, 32, 32], "mean": MEAN,
              "std": STD, "teacher": {"name": "none"}, "method": "none"}
    (student / "config.json").write_text(json.dumps(config))
    return model


def export_onnx(model: torch.nn.Module, path: Path, size: int = 32, metadata: dict[str, str] | None = None) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(model.eval(), (torch.randn(2, 3, size, size),), dynamo=True, input_names=["input"],
                                output_names=["embedding"], dynamic_shapes=({0: "batch"},), opset_version=18,
                                verbose=False)
    program.save(str(path), external_data=False)
    if metadata:
        proto = onnx.load(str(path))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(path))
    return path




def copy_with_metadata(source: Path, target: Path, metadata: dict[str, str]) -> Path:
    """Copy an ONNX file, adding ``metadata_props`` (cheaper than exporting again)."""
    import onnx

    proto = onnx.load(str(source))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(target))
    return target
