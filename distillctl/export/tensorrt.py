"""TensorRT engines from the exported ONNX files (optional extra: ``distillctl[tensorrt]``).

Written against the TensorRT 10 and 11 Python APIs (export_cache_data.md §A.4):

- explicit batch is the only mode (``create_network(0)``; the EXPLICIT_BATCH flag is gone);
- TensorRT 11 networks are always strongly typed: precision comes from the ONNX graph, so fp16 is
  built from ``student.fp16.onnx`` and INT8 from the symmetric ``student.int8.trt.onnx``;
- on TensorRT 10, INT8 QDQ is built strongly typed (opt-in flag) and fp16 uses ``BuilderFlag.FP16``
  on the fp32 graph (weak typing, the 10.x way); the IInt8 calibrators are not used (deprecated);
- fp32 clears ``BuilderFlag.TF32`` so that "fp32" means fp32 in the parity gate.

Engines only run on the GPU architecture and TensorRT version that built them, so both are in the
file name, and the timing cache (reused across rebuilds) is keyed the same way. I/O buffers are torch
CUDA tensors: no pycuda/cuda-python needed. Nothing here could be run on the CPU-only development
machine; the absent-TensorRT path is what the tests cover.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distillctl.errors import InputError, TrainingError, UsageError
from distillctl.export._fs import write_bytes_atomic

INSTALL_HINT = ("pip install 'distillctl[tensorrt]' on a machine with an NVIDIA GPU and driver "
                "(the TensorRT wheels download their libraries from pypi.nvidia.com)")
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")


def require_tensorrt() -> Any:
    """Import TensorRT and check for a CUDA GPU; otherwise a UsageError (exit 2) saying what to install."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional extra, imported only when asked for
    except ImportError as exc:  # missing package, or bindings without their shared libraries
        detail = f" ({exc})" if getattr(exc, "name", None) != "tensorrt" else ""
        raise UsageError(f"TensorRT is not installed or cannot be loaded{detail}; --format engine needs it",
                         hint=INSTALL_HINT) from None
    import torch

    if not torch.cuda.is_available():
        raise UsageError("TensorRT engines need an NVIDIA CUDA GPU, and PyTorch sees none", hint=INSTALL_HINT)
    return trt


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def gpu_tag() -> tuple[str, str]:
    """(slug of the GPU name, ``smXY``) of the current CUDA device."""
    import torch

    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "gpu"
    return slug, f"sm{major}{minor}"


def engine_file_name(precision: str, gpu: str, sm: str, trt_version: str) -> str:
    """E.g. ``student.fp16.h100-80gb-hbm3-sm90.trt10.13.engine``."""
    major_minor = ".".join(str(trt_version).split(".")[:2])
    return f"student.{precision}.{gpu}-{sm}.trt{major_minor}.engine"


def engine_source(precision: str, major: int, export_dir: Path) -> tuple[Path, bool, bool]:
    """Which ONNX to parse and how: (onnx path, strongly typed?, set the FP16 builder flag?)."""
    if precision not in ENGINE_PRECISIONS:
        raise UsageError(f"unknown engine precision '{precision}'; valid: {', '.join(ENGINE_PRECISIONS)}")
    if precision == "int8":
        return export_dir / "student.int8.trt.onnx", True, False
    if precision == "fp16" and major >= 11:
        return export_dir / "student.fp16.onnx", True, False
    return export_dir / "student.onnx", major >= 11, precision == "fp16"


@dataclass
class EngineInfo:
    """What was built, for the model card and the sidecar JSON."""

    path: str
    onnx: str
    precision: str
    gpu: str
    compute_capability: str
    tensorrt_version: str
    strongly_typed: bool
    batch_min: int
    batch_opt: int
    batch_max: int
    workspace_bytes: int
    timing_cache: str
    build_seconds: float
    size_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def build_engine(
    export_dir: str | Path,
    *,
    input_size: int,
    precision: str = "fp32",
    batch_min: int = 1,
    batch_opt: int = 32,
    batch_max: int = 256,
    workspace_bytes: int = 4 << 30,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> EngineInfo:
    """Parse the right ONNX for ``precision``, build a serialized engine, write it atomically."""
    trt = require_tensorrt()
    major = trt_major(trt)
    export_dir = Path(export_dir)
    onnx_path, strongly_typed, fp16_flag = engine_source(precision, major, export_dir)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path.name} is missing in {export_dir}; export it first",
                         hint="the engine format exports the ONNX variants it needs itself; rerun distillctl export")
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except TypeError:  # "factory function returned nullptr": CUDA could not be initialised
        raise UsageError("TensorRT could not initialise CUDA (driver/runtime mismatch or no GPU)", hint=INSTALL_HINT) from None
    flags = 0
    if strongly_typed and major == 10:  # 11.x: strongly typed always, the flag is not needed
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrainingError(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    shape = (3, input_size, input_size)
    profile.set_shape("input", (batch_min, *shape), (batch_opt, *shape), (batch_max, *shape))
    config.add_optimization_profile(profile)
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT 10 only (weak typing)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)

    gpu, sm = gpu_tag()
    version = str(trt.__version__)
    cache_path = export_dir / f"trt.{gpu}-{sm}.trt{'.'.join(version.split('.')[:2])}.timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TrainingError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    build_seconds = time.perf_counter() - started
    write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    engine_path = export_dir / engine_file_name(precision, gpu, sm, version)
    write_bytes_atomic(engine_path, bytes(plan))
    info = EngineInfo(
        path=str(engine_path), onnx=onnx_path.name, precision=precision, gpu=gpu, compute_capability=sm,
        tensorrt_version=version, strongly_typed=strongly_typed or major >= 11, batch_min=batch_min,
        batch_opt=batch_opt, batch_max=batch_max, workspace_bytes=workspace_bytes, timing_cache=cache_path.name,
        build_seconds=round(build_seconds, 3), size_bytes=engine_path.stat().st_size,
    )
    sidecar = {"input_size": input_size, "mean": mean, "std": std, "input": "input", "output": "embedding", **info.to_dict()}
    write_bytes_atomic(sidecar_path(engine_path), json.dumps(sidecar, indent=2, sort_keys=True).encode())
    return info


def _torch_dtype(trt: Any, dtype: Any):
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    for name, torch_dtype in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise TrainingError(f"unsupported TensorRT tensor dtype {dtype}")


class EngineRunner:
    """Runs a serialized engine on numpy batches with torch CUDA tensors as I/O buffers."""

    def __init__(self, engine_path: str | Path) -> None:
        import torch

        trt = require_tensorrt()
        self.trt = trt
        self.torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime and the engine
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise InputError(f"TensorRT could not load {engine_path} (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {name: self.engine.get_tensor_mode(name) for name in names}
        self.input_name = next(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        self.output_names = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]

    def run_tensor(self, batch):
        """Run a torch batch (any device); returns the first output as a float32 CUDA tensor."""
        torch, engine, context = self.torch, self.engine, self.context
        input_dtype = _torch_dtype(self.trt, engine.get_tensor_dtype(self.input_name))
        inputs = batch.to("cuda", dtype=input_dtype).contiguous()
        context.set_input_shape(self.input_name, tuple(inputs.shape))
        context.set_tensor_address(self.input_name, inputs.data_ptr())
        outputs = {}
        for name in self.output_names:
            dtype = _torch_dtype(self.trt, engine.get_tensor_dtype(name))
            outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda", dtype=dtype)
            context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise TrainingError("TensorRT execution failed")
        stream.synchronize()
        return outputs[self.output_names[0]].float()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run_tensor(self.torch.from_numpy(np.ascontiguousarray(batch))).cpu().numpy()


class EngineEncoder:
    """:class:`distillctl.eval.features.Encoder` over an engine, so ``eval knn x.engine`` works."""

    def __init__(self, engine_path: str | Path) -> None:
        import torch

        self.runner = EngineRunner(engine_path)
        self.input_device = torch.device("cuda")

    def __call__(self, batch):
        return self.runner.run_tensor(batch)


def sidecar_path(engine_path: str | Path) -> Path:
    """JSON next to an engine: its build info and preprocessing (trtexec cannot read embedded metadata)."""
    return Path(str(engine_path) + ".json")


def _load_engine(path: Path, device: str):
    require_tensorrt()  # exit 2 with the install hint before anything else
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise InputError(f"{path.name} has no sidecar {sidecar.name} with its preprocessing",
                         hint="build engines with distillctl export --format engine")
    info = json.loads(sidecar.read_text())
    preprocess = {"input_size": int(info["input_size"]), "mean": info["mean"], "std": info["std"]}
    return EngineEncoder(path), preprocess, f"tensorrt {path.name}"


def _register_with_eval() -> None:
    try:
        from distillctl.eval.features import register_artifact_loader
    except ImportError:  # evaluation package not installed alongside: nothing to register with
        return
    for suffix in (".engine", ".plan"):
        register_artifact_loader(suffix, _load_engine)


_register_with_eval()


def find_engines(export_dir: str | Path, trt: Any | None = None) -> list[Path]:
    """Engine files in an export directory, newest first; with ``trt``, only those built for this GPU and version."""
    engines = sorted(Path(export_dir).glob("student.*.engine"), key=lambda p: p.stat().st_mtime, reverse=True)
    if trt is None:
        return engines
    gpu, sm = gpu_tag()
    major_minor = ".".join(str(trt.__version__).split(".")[:2])
    return [path for path in engines if path.name.endswith(f".{gpu}-{sm}.trt{major_minor}.engine")]
