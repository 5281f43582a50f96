"""Fixture run directories in the layout the core pipeline writes (architecture.md contract).

``<run>/student/model.safetensors`` (timm ``num_classes=0`` state dict), ``<run>/student/config.json``
and ``<run>/summary.json``. The student is timm's tiny ``test_resnet`` at 32 px with seeded random
weights and perturbed BatchNorm statistics (so BN folding is exercised, not an identity).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ARCH = "test_resnet"
SIZE = 32
MEAN = [0.5, 0.5, 0.5]
STD = [0.25, 0.25, 0.25]


def make_run_dir(root: Path, arch: str = ARCH, seed: int = 0) -> Path:
    """Write a run directory with a deterministic student; returns its path."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=0, pretrained=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    run = root / "run"
    (run / "student").mkdir(parents=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(run / "student" / "model.safetensors"))
    config = {"arch": arch, "num_features": int(model.num_features), "input_size": [3, SIZE, SIZE], "mean": MEAN,
              "std": STD, "teacher": {"name": "fixture-teacher", "sha256": "0" * 64, "license": "apache-2.0"},
              "method": "simreg", "license": None}
    (run / "student" / "config.json").write_text(json.dumps(config, indent=2))
    summary = {"distillctl_version": "0.1.0", "method": "simreg", "teacher": {"name": "fixture-teacher", "knn_top1": 90.0},
               "student": {"arch": arch, "knn_top1": 80.0}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("export-run"))
