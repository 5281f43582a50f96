"""A finished ``distillctl`` run (``teacher.source: pretrain``, or any run directory) as a frozen teacher:
its student backbone, the SSL projection head its method trained (``heads.safetensors``), and the preprocessing
the run fed it. Teacher loading lives with the teachers; the pipeline only decides which run to load."""

from __future__ import annotations

from pathlib import Path

import torch

from distillctl._infra import sha256_file
from distillctl.rundir import RunDir
from distillctl.teachers.base import Preprocess, Teacher


def _projection_from_state(state: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    """Rebuild a Linear/BN/ReLU head saved by a method (keys ``<i>.weight`` …)."""
    layers: list[torch.nn.Module] = []
    indices = sorted({int(key.split(".")[0]) for key in state})
    for i in range(indices[-1] + 1):
        weight = state.get(f"{i}.weight")
        if weight is not None and weight.ndim == 2:
            layers.append(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=f"{i}.bias" in state))
        elif f"{i}.running_mean" in state:
            layers.append(torch.nn.BatchNorm1d(state[f"{i}.running_mean"].shape[0], affine=weight is not None))
        else:
            layers.append(torch.nn.ReLU())
    head = torch.nn.Sequential(*layers)
    head.load_state_dict(state, strict=True)
    return head.eval()


def load_run_as_teacher(run: RunDir | str | Path, name: str) -> Teacher:
    """A finished run's student (+ its SSL projection head) as a frozen teacher."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    from safetensors.torch import load_file

    from distillctl.students import load_student

    backbone, config = load_student(run.path)
    heads_path = run.student_dir / "heads.safetensors"
    projection, proj_dim = None, None
    if heads_path.is_file():
        heads = load_file(str(heads_path))
        head_state = {k[len("head."):]: v for k, v in heads.items() if k.startswith("head.")}
        if head_state:
            projection = _projection_from_state(head_state)
            proj_dim = [m for m in projection if isinstance(m, torch.nn.Linear)][-1].out_features
    return Teacher(name=name, arch=config.arch, backbone=backbone, embed_dim=config.num_features,
                   sha256=sha256_file(run.student_dir / "model.safetensors"), projection=projection,
                   proj_dim=proj_dim, license="self-trained", source=f"pretrain:{run.path}",
                   preprocess=Preprocess(mean=tuple(config.mean), std=tuple(config.std),
                                         input_size=config.input_size[-1], resize=None, crop_pct=_run_crop_pct(run),
                                         origin=f"the run that trained it ({run.path})"))


def _run_crop_pct(run: RunDir) -> float:
    """The centre-crop share a finished run evaluated with (1.0 when its recipe cannot be read)."""
    try:
        return float(run.recipe().data.crop_pct)
    except Exception:  # noqa: BLE001 - an older or hand-made run dir: whole images
        return 1.0
