"""Static INT8 variants of the fp32 ONNX student (onnxruntime ``quantize_static``) and fp16.

Recipe (export_cache_data.md §A.3): ``quant_pre_process`` (shape inference + graph fusions) once,
calibration on eval-transform images (:mod:`distillctl.export.calibration`, once per method, shared
by every form), per-channel int8 weights (essential for depthwise convs). The INT8 *form* decides
which kernels a runtime picks, so it is chosen per target and recorded in every artefact:

- ``qdq-u8s8`` (default ``student.int8.onnx`` on x86-64): uint8 asymmetric activations, int8
  per-channel weights, Q/DQ nodes. ONNX Runtime fuses these into its U8S8 (VNNI) integer kernels:
  on MobileNetV2 the session runs 1 QuantizeLinear, 2 Transpose (NHWC), 52 QLinearConv (ReLU6 folded
  into the output range), 10 QLinearAdd, 1 DequantizeLinear before the float pooling. Measured on
  the 2-core AVX512-VNNI benchmark machine, one thread, interleaved with fp32, process CPU time
  (``benchmarks/export_bench.py --random-weights mobilenetv2_100``): 1.5-2.1× fp32 at batch 1 and
  2.1-2.2× at batch 32, at 64 px and at 224 px alike; ResNet-18 at 64 px 4.1× / 3.5×, EfficientNet-B0
  1.1× / 1.2×. MobileNetV2's depthwise and narrow pointwise convolutions gain little from integer
  kernels against ONNX Runtime's blocked (NCHWc) fp32 convolutions, and at 64 px and batch 1 each of
  the 68 nodes costs a few microseconds whatever its size. The issue-15 figure of 3.2× at batch 1 was a wall-clock
  median under load: on 2 busy cores the same two files measure 1.3×-4.6× by wall-clock p50
  (a call that crosses a scheduler slice is inflated, and the longer fp32 call crosses more often).
- ``qoperator-u8s8``: the same numbers as QLinearConv/QLinearAdd operators instead of Q/DQ pairs;
  ONNX Runtime compiles both files to the same kernels, so they run at the same speed.
- ``qdq-s8s8``: int8 activations and weights (ONNX Runtime's recommendation off x86, e.g. ARM64).
- ``tensorrt`` (``student.int8.trt.onnx``): symmetric int8 activations and weights, every
  zero-point 0 and int8 — the only Q/DQ form TensorRT accepts (NVIDIA/TensorRT#2774). Slower than
  fp32 in ONNX Runtime on x86 (0.6-0.9×): its dedicated weight Q/DQ pairs and int8 activations leave
  15 of the 52 convolutions, the 35 Clips and 10 Adds in float between 167 Q/DQ nodes and 32 Transposes
  (298 nodes in all in the session graph, against 68 for qdq-u8s8).
  :func:`check_tensorrt_compatible` verifies that on the written file instead of trusting the flags.

On an x86 CPU without VNNI, uint8×int8 products can saturate the 16-bit accumulation of the AVX2
path, so the weights use 7 bits there (``reduce_range``; onnxruntime's quantization guide).
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from distillctl.errors import GateError, UsageError
from distillctl.export._fs import atomic_path
from distillctl.export.calibration import (CALIBRATION_METHODS, DEFAULT_CALIBRATION_BATCH, calibrate, ort_method,
                                           write_calibration_cache)

__all__ = ["CALIBRATION_METHODS", "FORMS", "Int8Form", "Int8Quantizer", "QuantizationInfo", "default_cpu_form",
           "quantize_int8", "check_tensorrt_compatible", "tensorrt_incompatibilities", "convert_fp16", "count_ops"]

# TensorRT consumes explicit Q/DQ only with zero-point 0 (symmetric) and int8 types; weights stay
# float behind a Q/DQ pair, each consumer gets its own pair, and biases stay float (TensorRT's parser
# rejects ORT's int32-quantized bias DequantizeLinear: microsoft/onnxruntime#17738).
TENSORRT_EXTRA_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True,
                          "AddQDQPairToWeight": True, "DedicatedQDQPair": True, "QuantizeBias": False}
QUANTIZED_OP_PREFIXES = ("QLinear", "ConvInteger", "MatMulInteger")


@dataclass(frozen=True)
class Int8Form:
    """One INT8 layout: ONNX quantization format, activation/weight types, symmetry, intended runtime."""

    name: str
    format: str  # "QDQ" or "QOperator"
    activation_type: str  # onnxruntime QuantType name
    weight_type: str
    symmetric: bool
    runtime: str
    description: str

    def to_dict(self) -> dict:
        return asdict(self)


FORMS: dict[str, Int8Form] = {form.name: form for form in (
    Int8Form("qdq-u8s8", "QDQ", "QUInt8", "QInt8", False, "onnxruntime CPU (x86-64)",
             "uint8 asymmetric activations, int8 per-channel weights, Q/DQ nodes (ONNX Runtime U8S8 kernels)"),
    Int8Form("qoperator-u8s8", "QOperator", "QUInt8", "QInt8", False, "onnxruntime CPU (x86-64)",
             "uint8 asymmetric activations, int8 per-channel weights, QLinear* operators"),
    Int8Form("qdq-s8s8", "QDQ", "QInt8", "QInt8", False, "onnxruntime CPU (ARM64 and others)",
             "int8 asymmetric activations, int8 per-channel weights, Q/DQ nodes"),
    Int8Form("tensorrt", "QDQ", "QInt8", "QInt8", True, "TensorRT (explicit quantization)",
             "symmetric int8 activations and weights, every zero-point 0, Q/DQ pairs (TensorRT's only INT8 input)"),
)}
CPU_FORMS = ("qdq-u8s8", "qoperator-u8s8", "qdq-s8s8")


def cpu_has_vnni() -> bool | None:
    """Whether the x86 CPU has VNNI int8 dot products (``None`` when /proc/cpuinfo cannot tell)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return None
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def default_cpu_form(machine: str | None = None) -> str:
    """The INT8 form that is fast for ONNX Runtime on this CPU: U8S8 Q/DQ on x86-64, S8S8 Q/DQ elsewhere."""
    machine = (machine or platform.machine()).lower()
    return "qdq-u8s8" if machine in ("x86_64", "amd64", "i686", "x86") else "qdq-s8s8"


def saturating_int8_kernels(path) -> bool:
    """Whether onnxruntime's fused CPU kernels would run this Q/DQ model's int8 activations through x86's saturating
    ``VPMADDUBSW`` (x86-64 without VNNI): then they do not compute the model's own math. The symmetric TensorRT
    form (int8 activations) measured that way lost its parity on an AVX2-only EPYC (mean cosine 0.971 against
    0.9885 for the same file run unfused), although TensorRT accumulates in int32 and never saturates. Gates
    evaluate such a model unfused (:func:`distillctl.export.onnx.ort_session` ``exact_int8``), which runs each
    DequantizeLinear → fp32 op → QuantizeLinear exactly."""
    if default_cpu_form() != "qdq-u8s8" or cpu_has_vnni() is not False:
        return False
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file we can read: the session reports it
        return False
    zero_points = {t.name: t.data_type for t in proto.graph.initializer}
    return any(node.op_type == "QuantizeLinear" and len(node.input) > 2
               and zero_points.get(node.input[2]) == onnx.TensorProto.INT8 for node in proto.graph.node)


def _reduce_range(form: Int8Form) -> bool:
    """7-bit weights only for uint8 activations on x86 without VNNI (AVX2 U8S8 saturation)."""
    return form.activation_type == "QUInt8" and default_cpu_form() == "qdq-u8s8" and cpu_has_vnni() is False


@dataclass
class QuantizationInfo:
    """What was done to produce one INT8 artefact (goes into the model card and the ONNX metadata)."""

    path: str
    form: str
    format: str
    activation_type: str
    weight_type: str
    per_channel: bool
    symmetric: bool
    reduce_range: bool
    runtime: str
    calibration_method: str
    calibration_images: int
    quantize_linear: int
    dequantize_linear: int
    quantized_ops: int
    size_bytes: int
    excluded_nodes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Int8Quantizer:
    """Pre-processes the fp32 graph once, calibrates once per method, writes any INT8 form.

    Use as a context manager: the pre-processed graph and calibration caches live in a temporary
    directory next to the artefacts (same filesystem, removed on exit).
    """

    def __init__(self, fp32_path: str | Path, calibration_images: np.ndarray, *, workdir: str | Path | None = None,
                 batch_size: int = DEFAULT_CALIBRATION_BATCH, per_channel: bool = True,
                 percentile: float | None = None) -> None:
        images = np.asarray(calibration_images, dtype=np.float32)
        if images.ndim != 4 or len(images) == 0:
            raise UsageError("INT8 calibration needs at least one image")
        self.fp32_path = Path(fp32_path)
        self.images = images
        self.batch_size = batch_size
        self.per_channel = per_channel
        self.percentile = percentile
        self._parent = Path(workdir) if workdir else self.fp32_path.parent
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._caches: dict[str, Path] = {}
        self._ranges: dict[str, object] = {}
        self.prepared: Path | None = None

    def __enter__(self) -> "Int8Quantizer":
        import contextlib
        import io

        from onnxruntime.quantization.shape_inference import quant_pre_process

        self._tmp = tempfile.TemporaryDirectory(dir=self._parent, prefix=".quant-")
        self.prepared = Path(self._tmp.name) / "prepared.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(self.fp32_path), str(self.prepared))
        return self

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def workdir(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("Int8Quantizer must be used as a context manager")
        return Path(self._tmp.name)

    def ranges(self, method: str):
        """Activation ranges (onnxruntime ``TensorsData``) for ``method``, computed once."""
        if method not in self._ranges:
            kwargs = {"percentile": self.percentile} if self.percentile is not None else {}
            scratch = self.workdir / f"calibrate-{method}"
            scratch.mkdir(exist_ok=True)
            self._ranges[method] = calibrate(self.prepared, self.images, method, scratch, batch_size=self.batch_size,
                                             **kwargs)
            self._caches[method] = write_calibration_cache(self._ranges[method], self.workdir / f"ranges-{method}.json")
        return self._ranges[method]

    def quantizable_nodes(self) -> list[str]:
        """Names of the nodes whose weights get quantized (Conv, Gemm, MatMul) in graph order."""
        import onnx

        proto = onnx.load(str(self.prepared), load_external_data=False)
        return [node.name for node in proto.graph.node if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]

    def write(self, out_path: str | Path, *, method: str, form: str, exclude: list[str] | tuple[str, ...] = ()
              ) -> QuantizationInfo:
        """Quantize the pre-processed graph to ``out_path`` in ``form`` with ``method``'s ranges."""
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        if form not in FORMS:
            raise UsageError(f"unknown INT8 form '{form}'; valid: {', '.join(FORMS)}")
        spec = FORMS[form]
        self.ranges(method)
        out_path = Path(out_path)
        extra: dict = dict(TENSORRT_EXTRA_OPTIONS) if spec.symmetric else {}
        reduce_range = _reduce_range(spec)
        written = self.workdir / f"{form}.onnx"
        quantize_static(
            str(self.prepared), str(written), None,
            quant_format=QuantFormat.QDQ if spec.format == "QDQ" else QuantFormat.QOperator,
            per_channel=self.per_channel, reduce_range=reduce_range,
            activation_type=getattr(QuantType, spec.activation_type), weight_type=getattr(QuantType, spec.weight_type),
            nodes_to_exclude=list(exclude), calibrate_method=ort_method(method), extra_options=extra,
            op_types_to_quantize=transformer_op_types(self.prepared),
            calibration_cache_path=str(self._caches[method]),
        )
        with atomic_path(out_path) as tmp:
            os.replace(written, tmp)
        counts = count_ops(out_path)
        quantized = sum(count for op, count in counts.items() if op.startswith(QUANTIZED_OP_PREFIXES))
        info = QuantizationInfo(
            path=str(out_path), form=spec.name, format=spec.format, activation_type=spec.activation_type,
            weight_type=spec.weight_type, per_channel=self.per_channel, symmetric=spec.symmetric,
            reduce_range=reduce_range, runtime=spec.runtime, calibration_method=method,
            calibration_images=int(len(self.images)), quantize_linear=counts.get("QuantizeLinear", 0),
            dequantize_linear=counts.get("DequantizeLinear", 0), quantized_ops=quantized,
            size_bytes=out_path.stat().st_size, excluded_nodes=list(exclude),
        )
        if spec.format == "QDQ" and (info.quantize_linear == 0 or info.dequantize_linear == 0):
            raise GateError(f"INT8 quantization of {self.fp32_path.name} produced no Q/DQ nodes")
        if spec.format == "QOperator" and quantized == 0:
            raise GateError(f"INT8 quantization of {self.fp32_path.name} produced no quantized operators")
        if spec.symmetric:
            check_tensorrt_compatible(out_path)
        return info


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_images: np.ndarray,
    *,
    method: str = "minmax",
    form: str | None = None,
    tensorrt: bool = False,
    per_channel: bool = True,
    percentile: float | None = None,
    exclude: list[str] | tuple[str, ...] = (),
    batch_size: int = DEFAULT_CALIBRATION_BATCH,
) -> QuantizationInfo:
    """One INT8 artefact of ``fp32_path`` calibrated on ``calibration_images`` (N,3,H,W normalised).

    ``form`` defaults to the CPU form of this machine (:func:`default_cpu_form`), or ``tensorrt``
    when ``tensorrt`` is true.
    """
    form = form or ("tensorrt" if tensorrt else default_cpu_form())
    ort_method(method)  # an unknown method is a usage error before any work
    out_path = Path(out_path)
    with Int8Quantizer(fp32_path, calibration_images, workdir=out_path.parent, batch_size=batch_size,
                       per_channel=per_channel, percentile=percentile) as quantizer:
        return quantizer.write(out_path, method=method, form=form, exclude=exclude)


def transformer_op_types(path: str | Path) -> list[str] | None:
    """For attention graphs (Softmax or LayerNormalization present): quantize only Conv/MatMul/Gemm.

    INT8 around softmax, LayerNorm and the residual adds costs a ViT most of its parity (ViT-Tiny/16 at 32 px
    after one epoch: p1 cosine 0.986 with every op quantized, 0.9999 with the matrix products only); None (every
    supported op, onnxruntime's default) for CNN graphs, whose results stay as they were.
    """
    counts = count_ops(path)
    if counts.get("Softmax", 0) or counts.get("LayerNormalization", 0):
        return ["Conv", "MatMul", "Gemm"]
    return None


def count_ops(path: str | Path) -> dict[str, int]:
    """Node count per op type (main graph)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return dict(Counter(node.op_type for node in proto.graph.node))


def tensorrt_incompatibilities(path: str | Path) -> list[str]:
    """Q/DQ nodes whose zero-point is missing, not int8, or not all zero (empty = TensorRT-compatible)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    constants: dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    problems: list[str] = []
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) < 3 or not node.input[2]:
            problems.append(f"{node.name or node.op_type}: no zero-point (defaults to uint8)")
            continue
        zero_point = constants.get(node.input[2])
        if zero_point is None:
            problems.append(f"{node.name or node.op_type}: zero-point '{node.input[2]}' is not a constant")
        elif zero_point.dtype != np.int8:
            problems.append(f"{node.name or node.op_type}: zero-point dtype {zero_point.dtype}, TensorRT needs int8")
        elif np.any(zero_point != 0):
            problems.append(f"{node.name or node.op_type}: {int(np.count_nonzero(zero_point))} non-zero zero-point(s)")
    if not any(node.op_type == "QuantizeLinear" for node in proto.graph.node):
        problems.append("no QuantizeLinear nodes: not a QDQ model")
    return problems


def check_tensorrt_compatible(path: str | Path) -> None:
    """Raise :class:`GateError` unless every Q/DQ zero-point is an int8 zero."""
    problems = tensorrt_incompatibilities(path)
    if problems:
        shown = "; ".join(problems[:3])
        raise GateError(f"{Path(path).name} is not TensorRT-compatible: {len(problems)} Q/DQ node(s) violate "
                        f"symmetric int8 quantization (e.g. {shown})")


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> Path:
    """fp16 weights and compute with fp32 inputs/outputs (``keep_io_types``), written atomically."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out_path = Path(out_path)
    proto = onnx.load(str(fp32_path))
    converted = convert_float_to_float16(proto, keep_io_types=True)
    with atomic_path(out_path) as tmp:
        onnx.save(converted, str(tmp))
    return out_path
