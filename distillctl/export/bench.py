"""Latency and throughput of the student per deployable format and batch size.

Each (format, batch) is timed ``repeats`` times after ``warmup`` untimed calls; p50/p90 are over
the timed calls, throughput is batch / p50. The formats of one runtime are timed *interleaved* with
the ONNX Runtime fp32 baseline (round-robin, the order reversed every round, :func:`runtime_groups`),
so load from other processes falls on every format alike and the speed-ups stay fair on a shared
machine; each call's process CPU time is recorded
beside its wall time (``cpu_p50_ms``, ``speedup_vs_onnx_fp32_cpu``), because a loaded machine
inflates wall-clock medians by whatever time the process spends descheduled (measured on 2 busy
cores: identical INT8 graphs 1.35× and 4.5× fp32 by wall p50 in the same run, 1.8× and 2.3× by CPU
time). Thread counts are recorded with the numbers, because CPU latency means nothing without them; torch, ONNX Runtime and OpenVINO get the same intra-op thread
count, so the comparison is like for like. Every row carries the artefact's export verdict (parity
and kNN budget from summary.json), and :func:`fastest` names, per batch and thread count, the
fastest format that passed — a fast artefact that failed its gate is not a candidate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from distillctl.errors import InputError, UsageError

BENCH_FORMATS = ("torch", "onnx", "onnx-fp16", "onnx-int8", "onnx-int8-trt", "openvino", "openvino-int8", "engine")
ARTEFACTS = {"onnx": "student.onnx", "onnx-int8": "student.int8.onnx", "onnx-fp16": "student.fp16.onnx",
             "onnx-int8-trt": "student.int8.trt.onnx", "openvino": "student.openvino.xml",
             "openvino-int8": "student.int8.openvino.xml"}
BASELINE = "onnx"  # speed-ups are against ONNX Runtime fp32 at the same batch and threads
BENCH_SCHEMA = "distillctl-bench/2"


def time_interleaved(calls: dict[str, Callable[[], object]], *, repeats: int, warmup: int,
                     syncs: dict[str, Callable[[], None] | None] | None = None
                     ) -> dict[str, tuple[list[float], list[float]]]:
    """``{name: (wall seconds, process CPU seconds)}`` of ``repeats`` calls of each callable, interleaved.

    Every callable gets ``warmup`` untimed calls first; then each round gives every callable one
    untimed call and one timed call, in reversed order on odd rounds, so that a slow phase of the
    machine is shared by all of them. The untimed call re-warms the caches after the previous
    format: measured at batch 1, a timed ONNX Runtime INT8 call right after an OpenVINO call took
    0.72 ms instead of 0.55-0.65 ms (fp32 barely moved), which would bias the ratios.
    """
    syncs = syncs or {}
    for name, call in calls.items():
        for _ in range(warmup):
            call()
        if syncs.get(name):
            syncs[name]()
    timings: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in calls}
    names = list(calls)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            sync = syncs.get(name)
            calls[name]()
            if sync:
                sync()
            wall, cpu = time.perf_counter(), time.process_time()
            calls[name]()
            if sync:
                sync()
            timings[name][0].append(time.perf_counter() - wall)
            timings[name][1].append(time.process_time() - cpu)
    return timings


def summarise(seconds: list[float], batch: int, cpu_seconds: list[float] | None = None) -> dict[str, float]:
    values = np.asarray(seconds) * 1000.0
    p50 = float(np.percentile(values, 50))
    out = {"p50_ms": round(p50, 4), "p90_ms": round(float(np.percentile(values, 90)), 4),
           "images_per_sec": round(batch / (p50 / 1000.0), 2) if p50 > 0 else float("inf")}
    if cpu_seconds is not None:
        out["cpu_p50_ms"] = round(float(np.percentile(np.asarray(cpu_seconds) * 1000.0, 50)), 4)
    return out


def bench_run(
    run_dir: str | Path,
    formats: list[str],
    batches: list[int],
    *,
    repeats: int = 20,
    warmup: int = 3,
    device: str | None = None,
    threads: list[int] | None = None,
) -> list[dict]:
    """Benchmark the student of ``run_dir`` and its exported artefacts; one dict per (threads, format, batch).

    ``formats`` may contain ``all``: every format whose artefact exists in ``<run>/export`` (TensorRT
    only where it is installed and an engine for this GPU exists). ``threads`` (default: torch's
    current count) sets torch, ONNX Runtime and OpenVINO alike for each pass. Each row says whether
    the artefact passed its export gates (``gate``: passed / failed / not-gated / reference).
    """
    from distillctl.students import count_parameters, load_student

    run_dir = Path(run_dir)
    export_dir = run_dir / "export"
    formats = expand_formats(formats, export_dir)
    if not batches or any(batch < 1 for batch in batches):
        raise UsageError(f"batch sizes must be positive integers, got {batches}")
    if repeats < 1 or warmup < 0:
        raise UsageError("--repeats must be >= 1 and warm-up >= 0")
    if threads is not None and (not threads or min(threads) < 1):
        raise UsageError(f"thread counts must be positive integers, got {threads}")
    model, config = load_student(run_dir)
    params = count_parameters(model)
    size = int(config.input_size[-1])
    gates = gate_status(run_dir)
    previous = torch.get_num_threads()
    rows: list[dict] = []
    try:
        for count in threads or [previous]:
            torch.set_num_threads(count)
            baseline = _make_runner(BASELINE, model, export_dir, count, device) if BASELINE in formats else None
            for group in runtime_groups(formats):
                runners = {name: baseline if name == BASELINE else _make_runner(name, model, export_dir, count, device)
                           for name in group}
                timed = dict(runners) if baseline is None else {BASELINE: baseline, **runners}
                for batch in batches:
                    images = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
                    timings = time_interleaved({name: runner[0](images) for name, runner in timed.items()},
                                               repeats=repeats, warmup=warmup,
                                               syncs={name: runner[1] for name, runner in timed.items()})
                    reference = (summarise(timings[BASELINE][0], batch, timings[BASELINE][1])
                                 if BASELINE in timings else None)
                    for name, (_, _, artefact, where) in runners.items():
                        wall, cpu = timings[name]
                        rows.append({
                            "format": name, "batch": batch, "threads": count, **summarise(wall, batch, cpu),
                            "repeats": repeats, "warmup": warmup, "size_mb": round(_size(artefact) / 1e6, 3),
                            "artefact": artefact.name, "params": params, "device": where, "torch_threads": count,
                            "ort_threads": count if name.startswith("onnx") else None,
                            "gate": gates.get(name, "not-gated"), "timing": "interleaved",
                            "interleaved_with": list(timed),
                            **({"baseline_p50_ms": reference["p50_ms"], "baseline_cpu_p50_ms": reference["cpu_p50_ms"]}
                               if reference else {}),
                        })
                del runners, timed
    finally:
        torch.set_num_threads(previous)
    order = {name: index for index, name in enumerate(formats)}
    rows.sort(key=lambda row: (row["threads"], order[row["format"]], row["batch"]))
    _add_speedups(rows)
    return rows


RUNTIME_GROUPS = (("onnx", "onnx-fp16", "onnx-int8", "onnx-int8-trt"), ("torch",), ("openvino", "openvino-int8"),
                  ("engine",))


def runtime_groups(formats: list[str]) -> list[list[str]]:
    """``formats`` split by runtime, ONNX Runtime first: each group is timed interleaved with the ORT fp32 baseline.

    Formats of different runtimes are not interleaved with each other, because one runtime's call
    disturbs the next call of another more than the same runtime's does: measured at batch 1 on one
    pinned CPU, ONNX Runtime INT8 took 0.46-0.48 ms interleaved with OpenVINO and 0.27-0.29 ms
    interleaved with ONNX Runtime fp32 only (fp32 moved 0.62-0.70 → 0.66).
    """
    return [[name for name in group if name in formats] for group in RUNTIME_GROUPS
            if any(name in formats for name in group)]


def expand_formats(formats: list[str], export_dir: Path) -> list[str]:
    """Validate ``formats``; ``all`` becomes torch plus every exported artefact present, in BENCH_FORMATS order."""
    unknown = [name for name in formats if name not in BENCH_FORMATS + ("all",)]
    if unknown or not formats:
        raise UsageError(f"unknown bench format(s) {', '.join(unknown) or '(none)'}; "
                         f"valid: all, {', '.join(BENCH_FORMATS)}")
    if "all" not in formats:
        return [name for name in BENCH_FORMATS if name in formats]
    present = {"torch"} | {name for name, file in ARTEFACTS.items() if (export_dir / file).is_file()}
    if name_available_engine(export_dir):
        present.add("engine")
    if present == {"torch"}:
        raise InputError(f"no exported artefacts in {export_dir}",
                         hint=f"run: distillctl export {export_dir.parent} --format onnx,onnx-int8")
    return [name for name in BENCH_FORMATS if name in present or name in formats]


def name_available_engine(export_dir: Path) -> bool:
    """True when TensorRT is usable here and an engine for this GPU / TensorRT version was exported."""
    try:
        from distillctl.export.tensorrt import find_engines, require_tensorrt

        return bool(find_engines(export_dir, require_tensorrt()))
    except Exception:  # noqa: BLE001 - no TensorRT, no GPU: simply not part of "all"
        return False


def gate_status(run_dir: Path) -> dict[str, str]:
    """``{bench format: passed | failed}`` from the export report in summary.json (parity and accuracy gates)."""
    import json

    try:
        report = json.loads((run_dir / "summary.json").read_text()).get("export") or {}
    except (OSError, ValueError, AttributeError):
        report = {}
    entries = {name: entry for name, entry in report.items() if isinstance(entry, dict)}
    if isinstance(entries.get("onnx-int8", {}).get("tensorrt_variant"), dict):
        entries["onnx-int8-trt"] = entries["onnx-int8"]["tensorrt_variant"]
    status = {"torch": "reference"}
    for name, entry in entries.items():
        if "parity" not in entry:
            continue
        passed = bool(entry["parity"].get("passed")) and bool((entry.get("accuracy") or {"passed": True}).get("passed"))
        key = "engine" if name.startswith("engine") else name
        status[key] = "passed" if passed else "failed"
    return status


def _add_speedups(rows: list[dict]) -> None:
    baseline = {(row["threads"], row["batch"]): row for row in rows if row["format"] == BASELINE}
    for row in rows:
        base = baseline.get((row["threads"], row["batch"]))
        if "baseline_p50_ms" in row:  # the ORT fp32 calls interleaved with this format
            base = {"p50_ms": row["baseline_p50_ms"], "cpu_p50_ms": row.get("baseline_cpu_p50_ms")}
        row["speedup_vs_onnx_fp32"] = round(base["p50_ms"] / row["p50_ms"], 3) if base and row["p50_ms"] > 0 else None
        if "cpu_p50_ms" in row:
            cpu = base.get("cpu_p50_ms") if base else None
            row["speedup_vs_onnx_fp32_cpu"] = round(cpu / row["cpu_p50_ms"], 3) if cpu and row["cpu_p50_ms"] > 0 else None


def fastest(rows: list[dict]) -> list[dict]:
    """Per (threads, batch): the fastest format that passed its gates (the PyTorch student counts as passed)."""
    best: dict[tuple[int, int], dict] = {}
    for row in rows:
        if row["gate"] not in ("passed", "reference"):
            continue
        key = (row["threads"], row["batch"])
        if key not in best or row["images_per_sec"] > best[key]["images_per_sec"]:
            best[key] = row
    return [{"threads": threads, "batch": batch, "format": row["format"], "images_per_sec": row["images_per_sec"],
             "p50_ms": row["p50_ms"], "speedup_vs_onnx_fp32": row["speedup_vs_onnx_fp32"]}
            for (threads, batch), row in sorted(best.items())]


def bench_report(run_dir: str | Path, rows: list[dict]) -> dict:
    """The one JSON object ``distillctl bench --json`` prints."""
    return {"schema": BENCH_SCHEMA, "run": str(run_dir), "baseline": BASELINE, "results": rows,
            "fastest": fastest(rows), "skipped": [], "not_gated": sorted({row["format"] for row in rows
                                                                          if row["gate"] == "not-gated"})}


def _size(artefact: Path) -> int:
    """Bytes of an artefact (an OpenVINO IR counts its .bin too)."""
    size = artefact.stat().st_size
    if artefact.suffix == ".xml" and artefact.with_suffix(".bin").is_file():
        size += artefact.with_suffix(".bin").stat().st_size
    return size


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
        export_format = "onnx-int8" if name == "onnx-int8-trt" else name
        raise InputError(f"{artefact} does not exist",
                         hint=f"run: distillctl export {export_dir.parent} --format {export_format}")
    if name.startswith("openvino"):
        from distillctl.export.openvino import ov_runner

        from distillctl.export.openvino import runtime_description

        run = ov_runner(artefact, threads=threads)
        return (lambda images: (lambda: run(images))), None, artefact, runtime_description(artefact)
    from distillctl.export.onnx import INPUT_NAME, ort_session

    session = ort_session(artefact, threads=threads, exact_int8=False)  # time the fused kernels a deployment runs

    def prepare_ort(images: np.ndarray):
        return lambda: session.run(None, {INPUT_NAME: images})

    return prepare_ort, None, artefact, "onnxruntime CPUExecutionProvider"
