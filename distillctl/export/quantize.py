"""Static INT8 (QDQ) and fp16 variants of the fp32 ONNX student, with onnxruntime.

Recipe (export_cache_data.md §A.3): ``quant_pre_process`` (shape inference + graph fusions) first,
then ``quantize_static`` in QDQ format, per-channel weights (essential for depthwise convs), with
calibration images passed through the *eval* transform. Two INT8 artefacts:

- ``student.int8.onnx``: QInt8 activations/weights, asymmetric activations (best for ORT CPU);
- ``student.int8.trt.onnx``: symmetric activations and weights, every zero-point 0 and int8 —
  the only Q/DQ form TensorRT accepts (NVIDIA/TensorRT#2774). :func:`check_tensorrt_compatible`
  verifies that on the written file instead of trusting the flags.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from distillctl.errors import GateError, UsageError
from distillctl.export._fs import atomic_path

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# TensorRT consumes explicit Q/DQ only with zero-point 0 (symmetric) and int8 types; weights stay
# float behind a Q/DQ pair, each consumer gets its own pair, and biases stay float (TensorRT's parser
# rejects ORT's int32-quantized bias DequantizeLinear: microsoft/onnxruntime#17738).
TENSORRT_EXTRA_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True,
                          "AddQDQPairToWeight": True, "DedicatedQDQPair": True, "QuantizeBias": False}


@dataclass
class QuantizationInfo:
    """What was done to produce one INT8 artefact (goes into the model card)."""

    path: str
    format: str
    per_channel: bool
    symmetric: bool
    calibration_method: str
    calibration_images: int
    quantize_linear: int
    dequantize_linear: int
    size_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


class ArrayCalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over normalised images, in fixed-size batches."""

    def __init__(self, images: np.ndarray, input_name: str = "input", batch_size: int = 16) -> None:
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.input_name = input_name
        self.batch_size = batch_size
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            return None
        batch = self.images[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self.position = 0

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size


def _calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if name not in methods:
        raise UsageError(f"unknown calibration method '{name}'; valid: {', '.join(CALIBRATION_METHODS)}")
    return methods[name]


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_images: np.ndarray,
    *,
    method: str = "minmax",
    tensorrt: bool = False,
    per_channel: bool = True,
    percentile: float = 99.999,
) -> QuantizationInfo:
    """Static QDQ INT8 of ``fp32_path`` calibrated on ``calibration_images`` (N,3,H,W normalised)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibrate_method = _calibration_method(method)
    if len(calibration_images) == 0:
        raise UsageError("INT8 calibration needs at least one image")
    out_path = Path(out_path)
    extra: dict = dict(TENSORRT_EXTRA_OPTIONS) if tensorrt else {}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    # onnxruntime's calibrators print progress on stdout: keep it out of `--json` output and the log.
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quant-") as workdir, \
            contextlib.redirect_stdout(io.StringIO()):
        prepared = Path(workdir) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        written = Path(workdir) / "int8.onnx"
        quantize_static(
            str(prepared), str(written), ArrayCalibrationReader(calibration_images),
            quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=calibrate_method, extra_options=extra,
            op_types_to_quantize=transformer_op_types(prepared),
            # Calibration intermediates go to the temp dir, not the current directory.
            calibration_cache_path=None,
        )
        with atomic_path(out_path) as tmp:
            os.replace(written, tmp)
    counts = count_ops(out_path)
    info = QuantizationInfo(
        path=str(out_path), format="QDQ", per_channel=per_channel, symmetric=tensorrt,
        calibration_method=method, calibration_images=int(len(calibration_images)),
        quantize_linear=counts.get("QuantizeLinear", 0), dequantize_linear=counts.get("DequantizeLinear", 0),
        size_bytes=out_path.stat().st_size,
    )
    if info.quantize_linear == 0 or info.dequantize_linear == 0:
        raise GateError(f"INT8 quantization of {fp32_path} produced no Q/DQ nodes")
    if tensorrt:
        check_tensorrt_compatible(out_path)
    return info


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
