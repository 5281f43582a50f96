"""OpenVINO artefacts (optional extra ``distillctl[openvino]``): fp32 IR from the ONNX export, INT8 IR by NNCF.

- ``student.openvino.xml`` (+ ``.bin``): ``openvino.convert_model`` of the verified fp32 ONNX file,
  saved with fp32 weights (``save_model`` would halve them to fp16 by default) and the batch
  dimension left dynamic.
- ``student.int8.openvino.xml``: NNCF post-training quantization of that IR with the same
  calibration images as the ONNX INT8 artefact. Tried in order: the ``performance`` preset
  (symmetric activations and weights), then ``mixed`` (asymmetric activations); the first within the
  kNN budget and the cosine floor is kept, every try recorded. Measured on the 64 px MobileNetV2
  benchmark student (512 images): performance mean/p1 cosine 0.992/0.968, mixed 0.989/0.955, mixed
  with full bias correction 0.989/0.954, all at the same speed.

Both are judged like every artefact: the parity gate against the PyTorch student and, for INT8, the
kNN accuracy budget. OpenVINO's CPU plugin computes in bf16 by default on CPUs with AVX512-BF16/AMX:
the fp32 IR is pinned to ``INFERENCE_PRECISION_HINT=f32`` (fp32 means fp32), the INT8 IR runs with
the plugin's default (its non-quantized remainder in bf16: on the 64 px MobileNetV2 student the same
embedding cosine as f32, 1.5x the speed at batch 32). Parity, kNN and ``bench`` use the same runner,
so the numbers measured are the numbers gated. The model card travels inside each IR as
``rt_info['distillctl']``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from distillctl.errors import GateError, InputError, UsageError

INSTALL_HINT = "pip install 'distillctl[openvino]'  (installs openvino and nncf)"
OPENVINO_PRESETS = ("performance", "mixed")
RT_INFO_KEY = "distillctl"


def require_openvino() -> Any:
    """Import OpenVINO (and NNCF) or raise a UsageError (exit 2) with the install hint."""
    try:
        import nncf  # noqa: F401, PLC0415 - optional extra, imported only when asked for
        import openvino as ov  # noqa: PLC0415
    except ImportError as exc:
        raise UsageError(f"--format openvino needs the OpenVINO extra, which is not installed ({exc})",
                         hint=INSTALL_HINT) from None
    return ov


def precision_hint(xml_path: str | Path) -> str | None:
    """``f32`` for the fp32 IR (it is called fp32, so it computes in fp32); the INT8 IR runs the way OpenVINO
    runs it by default (its float remainder in bf16 where the CPU has AVX512-BF16/AMX), and is gated so."""
    return None if ".int8." in Path(xml_path).name else "f32"


def compile_options(threads: int | None, precision: str | None = "f32") -> dict[str, str]:
    """CPU plugin options: ``precision`` (None: the plugin's default), latency mode, ``threads`` inference threads."""
    options = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if precision:
        options["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        options["INFERENCE_NUM_THREADS"] = str(int(threads))
    return options


def runtime_description(xml_path: str | Path) -> str:
    hint = precision_hint(xml_path)
    return f"OpenVINO CPU, INFERENCE_PRECISION_HINT={hint}" if hint else \
        "OpenVINO CPU, default inference precision (bf16 where the CPU has AVX512-BF16/AMX)"


def ov_runner(xml_path: str | Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A runner (normalised float32 batch → embeddings) over an IR on OpenVINO's CPU plugin, with the
    precision of :func:`precision_hint` (the same for the parity gate, the kNN gate and ``bench``)."""
    ov = require_openvino()
    compiled = ov.Core().compile_model(str(xml_path), "CPU", compile_options(threads, precision_hint(xml_path)))
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(batch: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})[output], copy=True)

    return run


class OpenVinoEncoder:
    """:class:`distillctl.eval.features.Encoder` over an IR (for the kNN accuracy gate)."""

    def __init__(self, xml_path: str | Path, threads: int | None = None) -> None:
        import torch

        self.input_device = torch.device("cpu")
        self._run = ov_runner(xml_path, threads)

    def __call__(self, batch):
        import torch

        return torch.from_numpy(self._run(batch.detach().to("cpu", torch.float32).contiguous().numpy()))


def ir_files(xml_path: str | Path) -> list[Path]:
    """The ``.xml`` and its ``.bin``."""
    xml_path = Path(xml_path)
    return [xml_path, xml_path.with_suffix(".bin")]


def _save_ir(model: Any, xml_path: Path) -> Path:
    """Save an ``ov.Model`` as fp32 IR, atomically for the pair (temp dir, then rename .bin before .xml)."""
    ov = require_openvino()
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml_path.parent, prefix=".ov-") as workdir:
        staged = Path(workdir) / xml_path.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(staged, xml_path)
    return xml_path


def conversion_failure(report: str) -> str:
    """One line from OpenVINO's multi-line conversion report: the operators it failed on and the first reason
    its shape inference gave (e.g. a pooling kernel larger than a 1x1 feature map of a small input)."""
    failed = re.search(r"Conversion is failed for:\s*([^\n]+)", report)
    reasons = [line.strip().rstrip(".") for line in report.splitlines()
               if re.search(r"larger than|must be|has to be|mismatch|not supported|unsupported", line, re.I)
               and not line.strip().startswith(("While validating", "Check "))]
    what = f"operators {failed.group(1).strip()}" if failed else "the graph"
    reason = reasons[0] if reasons else report.strip().splitlines()[-1].strip() if report.strip() else "no reason given"
    return f"{what}: {reason}"


def convert_ir(onnx_path: str | Path, xml_path: str | Path) -> Path:
    """fp32 IR of an ONNX file (dynamic batch kept). A graph OpenVINO's ONNX frontend rejects exits 2 with one
    line naming the operators, and nothing is written."""
    ov = require_openvino()
    with contextlib.redirect_stdout(sys.stderr):
        try:
            model = ov.convert_model(str(onnx_path))
        except Exception as exc:  # OpConversionFailure / GeneralFailure: C++ exceptions without a common base
            raise InputError(f"OpenVINO {ov.__version__.split('-')[0]} cannot convert {Path(onnx_path).name}: "
                             f"{conversion_failure(str(exc))}",
                             hint="leave openvino and openvino-int8 out of --format, or train the student at a "
                                  "larger --image-size (its last feature map must not shrink below its pooling kernels)"
                             ) from exc
    return _save_ir(model, Path(xml_path))


def set_ir_metadata(xml_path: str | Path, props: dict[str, str]) -> None:
    """Store ``props`` (string values, e.g. the model card's ``distillctl.*`` keys) in the IR's rt_info."""
    ov = require_openvino()
    model = ov.Core().read_model(str(xml_path))
    for key, value in sorted(props.items()):
        model.set_rt_info(value, [RT_INFO_KEY, key])
    _save_ir(model, Path(xml_path))


def read_ir_metadata(xml_path: str | Path) -> dict[str, str]:
    """The ``distillctl`` rt_info of an IR as a dict of strings."""
    ov = require_openvino()
    model = ov.Core().read_model(str(xml_path))
    if not model.has_rt_info([RT_INFO_KEY]):
        return {}
    section = model.get_rt_info([RT_INFO_KEY])
    entries = section.astype(dict) if hasattr(section, "astype") else dict(section)
    return {str(key): str(value.astype(str) if hasattr(value, "astype") else value) for key, value in entries.items()}


@dataclass
class OpenVinoInt8Info:
    """What NNCF did (model card)."""

    path: str
    preset: str
    fast_bias_correction: bool
    calibration_images: int
    ignored_nodes: list[str] = field(default_factory=list)
    fake_quantize: int = 0
    size_bytes: int = 0
    nncf_version: str = ""
    openvino_version: str = ""
    form: str = "openvino-nncf"

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_ir(fp32_xml: str | Path, out_xml: str | Path, calibration_images: np.ndarray, *,
                preset: str = "performance", ignored_nodes: list[str] | tuple[str, ...] = ()) -> OpenVinoInt8Info:
    """NNCF post-training INT8 of an fp32 IR, calibrated on ``calibration_images`` (N,3,H,W normalised)."""
    ov = require_openvino()
    import nncf

    if preset not in OPENVINO_PRESETS:
        raise UsageError(f"unknown OpenVINO INT8 preset '{preset}'; valid: {', '.join(OPENVINO_PRESETS)}")
    images = np.ascontiguousarray(calibration_images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise UsageError("OpenVINO INT8 calibration needs at least one image")
    model = ov.Core().read_model(str(fp32_xml))
    dataset = nncf.Dataset([images[i:i + 1] for i in range(len(images))])  # one image per item: any N works
    fast = True
    kwargs: dict[str, Any] = {}
    if ignored_nodes:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(ignored_nodes), validate=False)
    with contextlib.redirect_stdout(sys.stderr):
        presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
        quantized = nncf.quantize(model, dataset, preset=presets[preset], subset_size=len(images),
                                  fast_bias_correction=fast, **kwargs)
    out_xml = _save_ir(quantized, Path(out_xml))
    fake_quantize = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
    if fake_quantize == 0:
        raise GateError(f"NNCF quantization of {Path(fp32_xml).name} inserted no FakeQuantize operations")
    from importlib import metadata

    return OpenVinoInt8Info(path=str(out_xml), preset=preset, fast_bias_correction=fast,
                            calibration_images=int(len(images)), ignored_nodes=list(ignored_nodes),
                            fake_quantize=fake_quantize, size_bytes=sum(p.stat().st_size for p in ir_files(out_xml)),
                            nncf_version=metadata.version("nncf"), openvino_version=metadata.version("openvino"))


def remove_ir(xml_path: str | Path) -> None:
    for path in ir_files(xml_path):
        path.unlink(missing_ok=True)


def copy_ir(source: str | Path, destination: str | Path) -> None:
    for src, dst in zip(ir_files(source), ir_files(destination)):
        shutil.copyfile(src, dst)
