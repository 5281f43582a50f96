"""PyTorch student → self-contained ONNX file with a verified opset, names and dynamic batch.

The dynamo exporter (default since torch 2.9) can silently save a different opset than asked for
(export_cache_data.md §A.1, finding 4), so every export is read back and checked: opset, input and
output names, a symbolic batch dimension, and ``onnx.checker`` with ``full_check``. A check that
fails is a :class:`GateError` (exit 3): a file that does not say what it is must not ship.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch import nn

from distillctl.errors import GateError, UsageError
from distillctl.export._fs import atomic_path

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
BATCH_DIM = "batch"
EXPORTERS = ("dynamo", "legacy")
DEFAULT_OPSET = {"dynamo": 18, "legacy": 17}


def export_onnx(
    model: nn.Module,
    out_path: str | Path,
    input_size: int,
    *,
    opset: int | None = None,
    exporter: str = "dynamo",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export ``model`` (embedding output) to ``out_path`` and verify the result.

    ``opset`` defaults to 18 for the dynamo exporter and 17 for the legacy TorchScript one (the
    fallback for edge runtimes that cannot load opset 18 / IR 10). ``metadata`` lands in the
    model's ``metadata_props`` (string values only).
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter '{exporter}'; valid: {', '.join(EXPORTERS)}")
    opset = opset or DEFAULT_OPSET[exporter]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    try:  # MobileOne/RepVGG/FastViT: fold train-time branches first (a copy; no-op for other models)
        from timm.utils.model import reparameterize_model

        model = reparameterize_model(model, inplace=False).eval()
    except ImportError:
        pass
    # Batch >= 2: torch.export specialises dims of size 0 and 1, which would bake batch=1 in.
    example = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(example)  # timm: one forward before export (lazy buffers, SAME padding)

    with atomic_path(out_path) as tmp:
        _run_exporter(model, example, tmp, opset, exporter)
        if metadata:
            set_metadata(tmp, metadata)
        verify_onnx(tmp, opset)
    return out_path


def _run_exporter(model: nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: str) -> None:
    import warnings

    # The exporters print progress on stdout; keep stdout clean for `--json`.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(
                model, (example,), dynamo=True, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: BATCH_DIM},), opset_version=opset, optimize=True, verify=False,
            )
            # One file: TensorRT's parser and mobile runtimes want no external-data sidecar.
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
                opset_version=opset,
            )


def default_opset(path: str | Path) -> int:
    """The version of the default ONNX domain (``""`` / ``ai.onnx``) the file imports."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    versions = [entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")]
    return versions[0] if versions else -1


def verify_onnx(path: str | Path, opset: int) -> None:
    """checker(full_check) + opset + names + symbolic batch dim; any mismatch is a GateError."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError: one line is enough
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GateError(f"exported ONNX failed onnx.checker: {first}") from None
    try:  # every tensor's type and shape must be inferable (what TensorRT's parser needs too)
        onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GateError(f"exported ONNX failed strict shape inference: {first}") from None
    found = default_opset(path)
    if found != opset:
        raise GateError(
            f"exported ONNX has opset {found}, expected {opset} (the exporter's version conversion failed)",
            hint="try --exporter legacy (opset 17), or report the architecture that fails",
        )
    proto = onnx.load(str(path), load_external_data=False)
    inputs = [value.name for value in proto.graph.input
              if value.name not in {init.name for init in proto.graph.initializer}]
    outputs = [value.name for value in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise GateError(f"exported ONNX has inputs {inputs} and outputs {outputs}; expected ['{INPUT_NAME}'] and ['{OUTPUT_NAME}']")
    for value in (proto.graph.input[0], proto.graph.output[0]):
        first_dim = value.type.tensor_type.shape.dim[0]
        if first_dim.dim_param != BATCH_DIM:
            fixed = first_dim.dim_value if first_dim.HasField("dim_value") else "?"
            raise GateError(f"exported ONNX '{value.name}' has batch dim {fixed!r}, expected the symbolic '{BATCH_DIM}'")


def set_metadata(path: str | Path, props: dict[str, str], *, producer: str | None = "distillctl") -> None:
    """Replace ``metadata_props`` keys in ``props`` (others kept); rewrites the file atomically."""
    import onnx

    from distillctl import __version__

    path = Path(path)
    proto = onnx.load(str(path))
    bad = [key for key, value in props.items() if not isinstance(value, str)]
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    kept = [entry for entry in proto.metadata_props if entry.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in sorted(props.items()):
        proto.metadata_props.add(key=key, value=value)
    if producer:
        proto.producer_name = producer
        proto.producer_version = __version__
    if "distillctl.description" in props:
        proto.doc_string = props["distillctl.description"]
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def read_metadata(path: str | Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as a dict."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}


def ort_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                exact_int8: bool | None = None):
    """An onnxruntime session (CPU unless providers say otherwise) with explicit thread count.

    ``exact_int8``: no graph fusion, so Q/DQ runs as written. ``None`` (the default, for anything that judges a
    model's outputs) decides it: on when the session runs on the CPU provider and this CPU's fused kernels would
    saturate the model's int8 activations (:func:`distillctl.export.quantize.saturating_int8_kernels`).
    Speed measurements pass ``False``: they time the kernels a deployment runs."""
    import onnxruntime as ort

    providers = list(providers or ["CPUExecutionProvider"])
    if exact_int8 is None:
        from distillctl.export.quantize import saturating_int8_kernels

        exact_int8 = providers[0] == "CPUExecutionProvider" and saturating_int8_kernels(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if exact_int8:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


SLIM_INSTALL_HINT = "pip install 'distillctl[slim]'  (installs onnxslim)"


def require_onnxslim():
    """Import onnxslim (optional extra) or raise a UsageError (exit 2) with the install hint."""
    try:
        import onnxslim  # noqa: PLC0415 - optional extra, imported only when asked for
    except ImportError:
        raise UsageError("--slim needs onnxslim, which is not installed", hint=SLIM_INSTALL_HINT) from None
    return onnxslim


def slim_onnx(source: str | Path, out_path: str | Path, opset: int) -> dict[str, int]:
    """Graph clean-up with onnxslim (constant folding, dead/identity node removal, fusions) into ``out_path``.

    The slimmed file keeps the metadata and passes :func:`verify_onnx`; whether it computes the same
    embedding is for the caller's parity gate to decide. Returns the node counts before and after.
    """
    import onnx

    onnxslim = require_onnxslim()
    proto = onnx.load(str(source))
    before = len(proto.graph.node)
    with contextlib.redirect_stdout(sys.stderr):
        slimmed = onnxslim.slim(proto)
    del slimmed.metadata_props[:]
    slimmed.metadata_props.extend(proto.metadata_props)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        onnx.save(slimmed, str(tmp))
        verify_onnx(tmp, opset)
    return {"nodes_before": before, "nodes_after": len(slimmed.graph.node)}
