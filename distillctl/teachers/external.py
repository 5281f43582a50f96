"""Explicit conversion of non-PyTorch teachers: BYOL (JAX/Haiku dill pickle), SimCLR v1 (TF1 checkpoint).

Opening these files means unpickling arbitrary objects (BYOL) or running TensorFlow (SimCLR), so it
happens only through ``distillctl teacher convert NAME FILE``, in a separate Python process, and
only when the optional extra is installed; everything afterwards sees a safetensors file that has
passed the same structural check as every other teacher. The name mappings follow the published
converters' rules (chigur/byol-convert, tonylins/simclr-converter) and are *unverified against the
real files here*; the exact key-set check against torchvision ``resnet50`` guards them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from distillctl.errors import InputError, UsageError
from distillctl.teachers.archs import build_classifier_model
from distillctl.teachers.convert import Converted, check_structure
from distillctl.teachers.fetch import sha256_file, teacher_dir
from distillctl.teachers.registry import TeacherEntry
from distillctl.teachers.store import Stored, load_converted, save_converted

EXTRAS = {"byol": ("byol", ["dill", "jax", "haiku"]), "simclr1": ("tf", ["tensorflow"])}


def missing_modules(family: str) -> list[str]:
    return [module for module in EXTRAS[family][1] if importlib.util.find_spec(module) is None]


def require_extra(family: str) -> None:
    """Exit 2 with the install command when the optional extra is not installed."""
    extra, modules = EXTRAS[family]
    missing = missing_modules(family)
    if missing:
        raise UsageError(f"converting {family} checkpoints needs the optional '{extra}' extra (missing: {', '.join(missing)})",
                         hint=f"pip install {' '.join('dm-haiku' if m == 'haiku' else m for m in modules)} "
                              "— then rerun; ideally on a connected machine, then copy the cache folder")


# --- BYOL (Haiku names -> torchvision) ---------------------------------------------------------

def byol_to_torchvision(params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map flattened Haiku names (``.../block_group_0/~/block_1/~/conv_2/w``) to torchvision keys.
    BN statistics come in as ``.../batchnorm_k/~/mean_ema/average`` and ``.../var_ema/average``."""
    out: dict[str, torch.Tensor] = {}
    for name, value in params.items():
        if re.search(r"(projector|predictor)", name):
            continue
        tensor = torch.from_numpy(np.asarray(value, dtype=np.float32).copy())
        key = _byol_key(name)
        if key is None:
            continue
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "w" and tensor.dim() == 4:
            tensor = tensor.permute(3, 2, 0, 1)  # conv kernel HWIO -> OIHW
        elif leaf == "w" and tensor.dim() == 2:
            tensor = tensor.t()  # linear (in, out) -> (out, in)
        else:
            tensor = tensor.reshape(-1)  # BN scale/offset/EMA stats are stored as (1, 1, 1, C)
        out[key] = tensor.contiguous()
    for key in [k for k in out if k.endswith(".running_mean")]:
        out.setdefault(key.replace("running_mean", "num_batches_tracked"), torch.tensor(0))
    return out


def _byol_key(name: str) -> str | None:
    parts = name.split("/")
    leaf = parts[-1]
    if leaf in ("average", "hidden", "counter"):
        if leaf != "average":
            return None
        stat = {"mean_ema": "running_mean", "var_ema": "running_var"}.get(parts[-3] if parts[-2] == "~" else parts[-2])
        if stat is None:
            return None
        module = _byol_module("/".join(p for p in parts[:-2] if p not in ("~", "mean_ema", "var_ema")))
        return f"{module}.{stat}" if module else None
    module = _byol_module("/".join(p for p in parts[:-1] if p != "~"))
    param = {"w": "weight", "b": "bias", "scale": "weight", "offset": "bias"}.get(leaf)
    return f"{module}.{param}" if module and param else None


def _byol_module(path: str) -> str | None:
    if "classifier" in path:
        return "fc"
    if match := re.search(r"initial_(conv|batchnorm)", path):
        return "conv1" if match.group(1) == "conv" else "bn1"
    match = re.search(r"block_group_(\d+)/block_(\d+)/(conv|batchnorm|shortcut_conv|shortcut_batchnorm)(?:_(\d+))?", path)
    if not match:
        return None
    group, block, kind, index = int(match.group(1)), int(match.group(2)), match.group(3), match.group(4)
    prefix = f"layer{group + 1}.{block}"
    if kind == "shortcut_conv":
        return f"{prefix}.downsample.0"
    if kind == "shortcut_batchnorm":
        return f"{prefix}.downsample.1"
    return f"{prefix}.{'conv' if kind == 'conv' else 'bn'}{int(index or 0) + 1}"


# --- SimCLR v1 (TF variables by creation order -> torchvision) ---------------------------------

def simclr_to_torchvision(variables: dict[str, np.ndarray], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """TF1 SimCLR variables are named by creation order (``conv2d_17``); TF creates a block's
    projection shortcut *before* its convs, torchvision registers ``downsample`` last."""
    def order(kind: str) -> list[str]:
        names = {re.match(rf"base_model/({kind}(?:_\d+)?)/", n).group(1) for n in variables
                 if re.match(rf"base_model/{kind}(?:_\d+)?/", n)}
        return sorted(names, key=lambda n: int(n.rsplit("_", 1)[1]) if n[-1].isdigit() and "_" in n[len(kind):] else 0)

    convs = [m for m, mod in model.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    bns = [m for m, mod in model.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    def tf_order(names: list[str]) -> list[str]:  # move each downsample ahead of its block's first layer
        result: list[str] = []
        for name in names:
            if ".downsample." in name:
                block = name.split(".downsample.")[0]
                result.insert(next(i for i, n in enumerate(result) if n.startswith(block + ".")), name)
            else:
                result.append(name)
        return result
    tf_convs, tf_bns = order("conv2d"), order("batch_normalization")
    if len(tf_convs) != len(convs) or len(tf_bns) != len(bns):
        raise InputError(f"SimCLR checkpoint has {len(tf_convs)} convs/{len(tf_bns)} BNs, the ResNet needs {len(convs)}/{len(bns)}")
    out: dict[str, torch.Tensor] = {}
    for tf_name, torch_name in zip(tf_convs, tf_order(convs)):
        out[f"{torch_name}.weight"] = torch.from_numpy(np.asarray(variables[f"base_model/{tf_name}/kernel"])).permute(3, 2, 0, 1).contiguous()
    for tf_name, torch_name in zip(tf_bns, tf_order(bns)):
        for tf_key, key in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var")):
            out[f"{torch_name}.{key}"] = torch.from_numpy(np.asarray(variables[f"base_model/{tf_name}/{tf_key}"])).contiguous()
        out[f"{torch_name}.num_batches_tracked"] = torch.tensor(0)
    return out


# --- driver -------------------------------------------------------------------------------------

def convert_external(entry: TeacherEntry, file: Path) -> Stored:
    """Convert ``file`` in a child process (after the extra check), then check and store it."""
    require_extra(entry.family)
    folder = teacher_dir(entry.name)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / ".external.safetensors"
    command = [sys.executable, "-m", "distillctl.teachers.external", entry.family, str(file), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise InputError(f"converting {file} as {entry.family} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    from safetensors.torch import load_file

    state = load_file(str(out))
    model = build_classifier_model(entry.arch)
    converted = Converted(entry.family, {k: v for k, v in state.items() if not k.startswith("fc.")})
    backbone, _ = check_structure(converted, entry.arch, model, None, [], None, what=f"{file.name} (teacher '{entry.name}')")
    meta = {"name": entry.name, "arch": entry.arch.model_dump(), "family": entry.family, "converter_version": 1,
            "raw": {"filename": file.name, "sha256": sha256_file(file), "verified": False, "source": f"convert:{file}"},
            "conversion": converted.report(), "embed_dim": entry.embed_dim, "license": entry.license.id}
    manifest = save_converted(folder, backbone, None, None, meta)
    out.unlink(missing_ok=True)
    return load_converted(folder, manifest)


def _child(family: str, source: str, dest: str) -> None:  # pragma: no cover - needs the extras
    from safetensors.torch import save_file

    if family == "byol":
        import dill

        with open(source, "rb") as handle:
            checkpoint = dill.load(handle)
        state = checkpoint["experiment_state"]
        flat: dict[str, np.ndarray] = {}
        for tree in (state.online_params, state.online_state):
            for module, leaves in tree.items():
                for leaf, value in leaves.items():
                    flat[f"{module}/{leaf}"] = np.asarray(value)
        tensors = byol_to_torchvision(flat)
    else:
        import tensorflow as tf
        import torchvision

        reader = tf.train.load_checkpoint(source)
        names = [n for n in reader.get_variable_to_shape_map() if n.startswith("base_model/")]
        tensors = simclr_to_torchvision({n: reader.get_tensor(n) for n in names}, torchvision.models.resnet50())
    save_file(tensors, dest)


if __name__ == "__main__":  # pragma: no cover
    _child(sys.argv[1], sys.argv[2], sys.argv[3])
