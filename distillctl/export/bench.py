"""Latency and throughput of the student per deployable format and batch size.

Each (format, batch) is timed ``repeats`` times after ``warmup`` untimed calls; p50/p90 are over
the timed calls, throughput is batch / p50. Thread counts (torch intra-op, ORT intra-op) are
recorded with the numbers, because CPU latency means nothing without them. ONNX Runtime sessions
get the same intra-op thread count as torch, so the comparison is like for like.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from distillctl.errors import InputError, UsageError

BENCH_FORMATS = ("torch", "onnx", "onnx-int8", "onnx-fp16", "engine")
ARTEFACTS = {"onnx": "student.onnx", "onnx-int8": "student.int8.onnx", "onnx-fp16": "student.fp16.onnx"}


def time_runner(run: Callable[[], object], *, repeats: int, warmup: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``run`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    if sync:
        sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if sync:
            sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def summarise(seconds: list[float], batch: int) -> dict[str, float]:
    values = np.asarray(seconds) * 1000.0
    p50 = float(np.percentile(values, 50))
    return {"p50_ms": round(p50, 4), "p90_ms": round(float(np.percentile(values, 90)), 4),
            "images_per_sec": round(batch / (p50 / 1000.0), 2) if p50 > 0 else float("inf")}


def bench_run(
    run_dir: str | Path,
    formats: list[str],
    batches: list[int],
    *,
    repeats: int = 20,
    warmup: int = 3,
    device: str | None = None,
) -> list[dict]:
    """Benchmark the student of ``run_dir`` and its exported artefacts; one dict per (format, batch)."""
    from distillctl.students import count_parameters, load_student

    unknown = [name for name in formats if name not in BENCH_FORMATS]
    if unknown:
        raise UsageError(f"unknown bench format(s) {', '.join(unknown)}; valid: {', '.join(BENCH_FORMATS)}")
    if not batches or any(batch < 1 for batch in batches):
        raise UsageError(f"batch sizes must be positive integers, got {batches}")
    if repeats < 1 or warmup < 0:
        raise UsageError("--repeats must be >= 1 and warm-up >= 0")
    run_dir = Path(run_dir)
    model, config = load_student(run_dir)
    params = count_parameters(model)
    size = int(config.input_size[-1])
    export_dir = run_dir / "export"
    threads = torch.get_num_threads()
    rows: list[dict] = []
    for name in formats:
        runner, sync, artefact, where = _make_runner(name, model, export_dir, threads, device)
        for batch in batches:
            images = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
            call = runner(images)
            seconds = time_runner(call, repeats=repeats, warmup=warmup, sync=sync)
            rows.append({
                "format": name, "batch": batch, **summarise(seconds, batch), "repeats": repeats, "warmup": warmup,
                "size_mb": round(artefact.stat().st_size / 1e6, 3), "artefact": artefact.name, "params": params,
                "device": where, "torch_threads": threads, "ort_threads": threads if name.startswith("onnx") else None,
            })
    return rows


def _make_runner(name: str, model: torch.nn.Module, export_dir: Path, threads: int, device: str | None):
    """(batch → zero-arg callable, sync or None, artefact path, device description)."""
    if name == "torch":
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        module = model.to(target).eval()
        weights = export_dir.parent / "student" / "model.safetensors"
        sync = torch.cuda.synchronize if target.type == "cuda" else None

        def prepare_torch(images: np.ndarray):
            tensor = torch.from_numpy(images).to(target)

            def call():
                with torch.inference_mode():
                    return module(tensor)

            return call

        return prepare_torch, sync, weights, f"torch eager fp32 ({target.type})"
    if name == "engine":
        from distillctl.export.tensorrt import EngineRunner, find_engines, require_tensorrt

        engines = find_engines(export_dir, require_tensorrt())
        if not engines:
            raise InputError(f"no TensorRT engine for this GPU and TensorRT version in {export_dir}",
                             hint=f"run: distillctl export {export_dir.parent} --format engine")
        engine = EngineRunner(engines[0])
        return (lambda images: (lambda: engine(images))), None, engines[0], "tensorrt (cuda)"
    artefact = export_dir / ARTEFACTS[name]
    if not artefact.is_file():
        raise InputError(f"{artefact} does not exist", hint=f"run: distillctl export {export_dir.parent} --format {name}")
    from distillctl.export.onnx import INPUT_NAME, ort_session

    session = ort_session(artefact, threads=threads)

    def prepare_ort(images: np.ndarray):
        return lambda: session.run(None, {INPUT_NAME: images})

    return prepare_ort, None, artefact, "onnxruntime CPUExecutionProvider"
