"""Frozen embeddings for evaluation: the centre-view transform, encoders (PyTorch, ONNX), a feature cache.

Every evaluation (kNN, linear probe, INT8 accuracy gates) goes through :func:`embed_dataset`, so a
checkpoint and its exported artefacts see exactly the same pixels: the centre view of
:mod:`distillctl.data.views` (resize the ``crop_pct`` box of the short side to ``input_size``,
bilinear + antialias, on uint8), then per-batch normalisation.

An encoder is anything callable on a normalised float batch (B,3,S,S) returning (B,D) — see
:class:`Encoder`. ``nn.Module`` s are wrapped by :class:`TorchEncoder` (eval mode, inference mode);
:class:`OnnxEncoder` runs an ``.onnx`` file with onnxruntime. Other runtimes (TensorRT) plug in
through :func:`register_artifact_loader` without this module importing them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from distillctl._infra import sha256_file
from distillctl.data.bad_images import BadImages, load_or_substitute, try_load
from distillctl.data.splits import align_classes  # noqa: F401  (re-exported: one class alignment for run/eval/export)
from distillctl.data.views import ViewSpec, apply_view_uint8, normalize, sample_view
from distillctl.errors import InputError, UsageError


@runtime_checkable
class Encoder(Protocol):
    """Maps a normalised float32 batch (B,3,S,S) to embeddings (B,D).

    ``input_device`` is where the batch should live before the call ("cpu" for onnxruntime, the
    model's device for PyTorch, "cuda" for a TensorRT engine fed with device pointers).
    """

    input_device: torch.device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


class TorchEncoder:
    """An ``nn.Module`` in eval mode (BatchNorm uses running stats), called under ``inference_mode``.

    The module's previous train/eval mode is restored after each call, so a training loop can
    evaluate its live student without side effects.
    """

    def __init__(self, module: nn.Module, device: str | torch.device = "cpu", sha256: str | None = None) -> None:
        self.module = module.to(device)
        self.sha256 = sha256  # identifies the weights (feature-cache key) when known
        self.input_device = torch.device(device)
        first = next(iter(module.parameters()), None)
        self.dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode():
                out = self.module(batch.to(self.input_device, dtype=self.dtype))
        finally:
            self.module.train(was_training)
        return out.float()


class OnnxEncoder:
    """An onnxruntime session over an exported student (input ``input``, output ``embedding``)."""

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"ONNX file not found: {self.path}")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        from distillctl.export.onnx import ort_session

        try:  # on the CPU provider, int8 activations on x86 without VNNI run Q/DQ as written (ort_session)
            self.session = ort_session(self.path, threads=int(threads) if threads else None, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own exception classes
            raise InputError(f"cannot load ONNX model {self.path}: {str(exc).splitlines()[0]}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        input_names, output_names = [i.name for i in inputs], [o.name for o in outputs]
        self.input_name = "input" if "input" in input_names else input_names[0]
        self.output_name = "embedding" if "embedding" in output_names else output_names[0]
        self.input_shape = next(i.shape for i in inputs if i.name == self.input_name)
        self.providers = self.session.get_providers()
        self.input_device = torch.device("cpu")
        self.crop_pct: float | None = None  # set from the artefact's metadata when it records one

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)


def as_encoder(encoder: Encoder | nn.Module | Callable[[torch.Tensor], torch.Tensor], device: str | torch.device = "cpu") -> Encoder:
    """Wrap an ``nn.Module`` (or a bare callable, run on ``device``) so it satisfies :class:`Encoder`."""
    if isinstance(encoder, nn.Module):
        return TorchEncoder(encoder, device)
    if not hasattr(encoder, "input_device"):
        fn = encoder

        class _Callable:
            input_device = torch.device(device)

            def __call__(self, batch: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return fn(batch)

        return _Callable()
    return encoder  # type: ignore[return-value]


class _CentreViews(torch.utils.data.Dataset):
    """Dataset adaptor: decoded image → uint8 centre view (3,S,S) and label. Runs in DataLoader workers.

    An unreadable image is skipped (``None`` view) and reported with the item: evaluation must not count
    another image twice (data/bad_images.py). With ``substitute`` it gets its keyed substitute's view instead,
    so every index keeps its row (callers that index the result by image, e.g. kNN bags)."""

    def __init__(self, dataset: Any, spec: ViewSpec, substitute: bool = False) -> None:
        self.dataset = dataset
        self.spec = spec
        self.substitute = substitute

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, list[tuple[str, str]]]:
        if self.substitute:
            _, image, bad = load_or_substitute(self.dataset, index)
        else:
            image, bad = try_load(self.dataset, index)
        if image is None:
            return None, int(self.dataset.labels[index]), bad
        params = sample_view(self.spec, int(image.shape[-2]), int(image.shape[-1]), None)
        return apply_view_uint8(image, params, self.spec), int(self.dataset.labels[index]), bad


def _collate_readable(items: list) -> tuple[torch.Tensor | None, torch.Tensor, list[tuple[str, str]]]:
    """Stack the readable items' views and labels (``None`` views when none is); the unreadable files met."""
    bad = [entry for item in items for entry in item[2]]
    kept = [item for item in items if item[0] is not None]
    if not kept:
        return None, torch.zeros(0, dtype=torch.int64), bad
    return (torch.stack([item[0] for item in kept]), torch.tensor([item[1] for item in kept], dtype=torch.int64),
            bad)


def eval_transform(input_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875) -> dict:
    """The evaluation transform as plain data (recorded in results and in cache keys)."""
    return {"view": "centre", "size": int(input_size), "crop_pct": float(crop_pct), "interpolation": "bilinear+antialias",
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def embed_dataset(
    encoder: Encoder | nn.Module,
    dataset: Any,
    *,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 0.875,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    bad_images: BadImages | None = None,
    progress: Callable[[int], None] | None = None,
    substitute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every readable image of ``dataset`` (centre view); returns (N×D float32, N int64 labels) on CPU.

    Unreadable images are skipped (N drops by their number), or with ``substitute`` replaced by their keyed
    substitute (row i stays image i's), and added to ``bad_images``; the caller then decides
    (``BadImages.finish``). Without a collector the limit is checked and the images are reported here.
    ``progress(n)`` is called after each batch of n images (long evaluations report as they go)."""
    if len(dataset) == 0:
        raise InputError("cannot embed an empty dataset")
    collector = bad_images if bad_images is not None else BadImages("eval", len(dataset))
    runner = as_encoder(encoder, device)
    spec = ViewSpec(size=int(input_size), family="centre", crop_pct=float(crop_pct))
    loader = torch.utils.data.DataLoader(
        _CentreViews(dataset, spec, substitute), batch_size=int(batch_size), shuffle=False, num_workers=int(num_workers),
        pin_memory=runner.input_device.type == "cuda", persistent_workers=False, collate_fn=_collate_readable,
    )
    embeddings: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for views, batch_labels, bad in loader:
        collector.add(bad)
        if views is None:
            continue
        batch = normalize(views.to(runner.input_device, non_blocking=True), tuple(mean), tuple(std))
        out = runner(batch)
        if out.ndim != 2 or out.shape[0] != views.shape[0]:
            raise InputError(
                f"encoder returned shape {tuple(out.shape)} for a batch of {views.shape[0]}; expected (batch, dim)",
                hint="students must be built with num_classes=0 so forward() returns the pooled embedding",
            )
        embeddings.append(out.detach().to("cpu", torch.float32))
        labels.append(batch_labels.to(torch.int64))
        if progress is not None:
            progress(int(views.shape[0]))
    if bad_images is None:
        collector.finish("substituted" if substitute else "skipped")
    if not embeddings:
        raise InputError(f"no image of the {len(dataset)} could be read", hint="check the data")
    result = torch.cat(embeddings)
    if not torch.isfinite(result).all():
        raise InputError("the encoder produced non-finite embeddings (NaN/inf)")
    return result, torch.cat(labels)


# --------------------------------------------------------------------------------------------------
# Loading a target: run dir, student dir, or an exported artefact.

ArtifactLoader = Callable[[Path, str], tuple[Encoder, dict, str]]
_ARTIFACT_LOADERS: dict[str, ArtifactLoader] = {}
# Suffixes whose loader lives in an optional module, imported on first use (it registers itself).
_LAZY_LOADER_MODULES = {".engine": "distillctl.export.tensorrt", ".plan": "distillctl.export.tensorrt"}


def register_artifact_loader(suffix: str, loader: ArtifactLoader) -> None:
    """Make ``load_encoder`` accept files ending in ``suffix`` (e.g. ``.engine`` for TensorRT)."""
    _ARTIFACT_LOADERS[suffix.lower()] = loader


file_sha256 = sha256_file  # one sha256 helper for the whole tool (distillctl._infra)


def _preprocess_from_student_config(config_path: Path) -> dict | None:
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
        return {"input_size": int(_as_list(config["input_size"])[-1]), "mean": [float(v) for v in config["mean"]],
                "std": [float(v) for v in config["std"]]}
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"unreadable student config {config_path}: {exc}") from None


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _preprocess_from_onnx_metadata(meta: dict[str, str]) -> dict:
    """Read ``input_size``/``mean``/``std`` (JSON strings) from plain, namespaced or model-card keys."""
    found: dict[str, Any] = {}
    card: dict = {}
    if "distillctl.model_card" in meta:
        try:
            card = json.loads(meta["distillctl.model_card"]).get("input", {}) or {}
        except (ValueError, AttributeError):
            card = {}
    for key, aliases in (("input_size", ("input_size", "distillctl.input.size", "distillctl.input_size")),
                         ("mean", ("mean", "distillctl.input.mean")), ("std", ("std", "distillctl.input.std")),
                         ("crop_pct", ("crop_pct", "distillctl.input.crop_pct"))):
        for alias in aliases:
            if alias in meta:
                try:
                    found[key] = json.loads(meta[alias])
                except ValueError:
                    raise InputError(f"ONNX metadata {alias}={meta[alias]!r} is not JSON") from None
                break
        else:
            for card_key in ((key, "size", "hw") if key == "input_size" else (key,)):
                if card_key in card:
                    found[key] = card[card_key]
                    break
    if "input_size" in found:
        found["input_size"] = int(_as_list(found["input_size"])[-1])
    return found


def _load_onnx(path: Path, device: str) -> tuple[Encoder, dict, str]:
    providers = None if str(device).startswith("cuda") else ["CPUExecutionProvider"]
    encoder = OnnxEncoder(path, providers=providers)
    preprocess = _preprocess_from_onnx_metadata(encoder.metadata())
    if "crop_pct" in preprocess:  # the export's eval crop; callers pass crop_pct separately
        encoder.crop_pct = float(preprocess.pop("crop_pct"))
    missing = [k for k in ("input_size", "mean", "std") if k not in preprocess]
    if missing:
        fallback = _preprocess_from_student_config(path.parent.parent / "student" / "config.json") or \
            _preprocess_from_student_config(path.parent / "config.json")
        if fallback is not None:
            for key in missing:
                preprocess[key] = fallback[key]
        elif missing != ["input_size"]:  # the input size alone can come from a static input shape
            raise InputError(
                f"{path} carries no preprocessing metadata ({', '.join(missing)}) and no ../student/config.json",
                hint="export with distillctl (it writes input_size/mean/std into metadata_props) or keep the run layout",
            )
    if "input_size" not in preprocess:
        static = encoder.input_shape[-1]
        if not isinstance(static, int):
            raise InputError(f"cannot tell the input size of {path}: no metadata and a dynamic spatial shape")
        preprocess["input_size"] = static
    return encoder, preprocess, f"onnx {path.name} ({', '.join(encoder.providers)})"


register_artifact_loader(".onnx", _load_onnx)


TEACHER_PREFIX = "teacher:"


def _load_teacher_target(spec: str, device: str, teacher_arch: str | None, accept_license: bool) -> tuple[Encoder, dict, str]:
    """A teacher (registry name, ``timm:<tag>`` or local checkpoint) evaluated like any student."""
    from distillctl.teachers.resolve import load_teacher

    teacher = load_teacher(spec, teacher_arch, None, accept_license=accept_license, device=device)
    pre = teacher.preprocess
    preprocess = {"input_size": int(pre.input_size), "mean": [float(v) for v in pre.mean], "std": [float(v) for v in pre.std]}
    return TorchEncoder(teacher.backbone, device, sha256=teacher.sha256), preprocess, f"teacher {teacher.name} ({teacher.arch})"


def load_encoder(target: str | Path, device: str = "cpu", *, teacher_arch: str | None = None,
                 accept_license: bool = False) -> tuple[Encoder, dict, str]:
    """Open what the user points at: a run dir, a ``student/`` dir, an artefact (``.onnx``, ``.engine``),
    or ``teacher:<name|timm:tag|file>`` so teachers are measured under the same protocol.

    Returns ``(encoder, {"input_size", "mean", "std"}, description)``.
    """
    if str(target).startswith(TEACHER_PREFIX):
        return _load_teacher_target(str(target)[len(TEACHER_PREFIX):], str(device), teacher_arch, accept_license)
    path = Path(target).expanduser()
    if not path.exists():
        raise InputError(f"evaluation target does not exist: {path}",
                         hint="pass a run directory, its student/ directory, or an exported .onnx file")
    if path.is_dir():
        from distillctl.students import load_student, require_student_files

        student_dir = require_student_files(path, hint="pass a finished run directory, a student/ directory or an "
                                                       ".onnx file")[0].parent
        model, config = load_student(student_dir)
        preprocess = {"input_size": int(_as_list(config.input_size)[-1]), "mean": [float(v) for v in config.mean],
                      "std": [float(v) for v in config.std]}
        encoder = TorchEncoder(model, device, sha256=encoder_fingerprint(student_dir))
        return encoder, preprocess, f"student {config.arch} ({student_dir})"
    suffix = path.suffix.lower()
    if suffix not in _ARTIFACT_LOADERS and suffix in _LAZY_LOADER_MODULES:
        from importlib import import_module

        try:
            import_module(_LAZY_LOADER_MODULES[suffix])
        except ImportError:
            pass
    if suffix not in _ARTIFACT_LOADERS:
        hint = ("TensorRT engines need `pip install 'distillctl[tensorrt]'` and a CUDA GPU"
                if suffix in _LAZY_LOADER_MODULES else "supported: a run dir, a student dir, " + ", ".join(sorted(_ARTIFACT_LOADERS)))
        raise UsageError(f"cannot evaluate {path.name}: no loader for '{suffix or path.name}' files", hint=hint)
    return _ARTIFACT_LOADERS[suffix](path, str(device))


def encoder_fingerprint(target: str | Path, encoder: Any = None) -> str:
    """sha256 identifying the weights behind a target (the artefact file, or student weights + config)."""
    known = getattr(encoder, "sha256", None)
    if known:
        return str(known)
    if str(target).startswith(TEACHER_PREFIX):
        raise InputError(f"cannot fingerprint {target} without its loaded encoder")
    path = Path(target).expanduser()
    if path.is_dir():
        from distillctl.students import require_student_files

        student_dir = require_student_files(path)[0].parent
        digest = hashlib.sha256()
        for name in ("model.safetensors", "config.json"):
            digest.update(file_sha256(student_dir / name).encode())
        return digest.hexdigest()
    return file_sha256(path)
