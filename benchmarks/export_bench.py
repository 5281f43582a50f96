"""Export benchmark: CPU latency of the distilled benchmark student in every deployable format (PyTorch eager,
ONNX Runtime fp32 / fp16 / INT8 in the CPU form and the TensorRT form, OpenVINO fp32 / INT8) at batch 1 and 32 on
one pinned thread, the INT8 kNN accuracy delta, and the issue-15 targets.

Uses the real CLI: ``distillctl export RUN --format onnx,onnx-fp16,onnx-int8[,openvino,openvino-int8] --json``
(parity gates, INT8 calibration on the run's training images with the product's default kNN budget of 1 point,
kNN of every INT8 artefact vs fp32), then ``distillctl bench RUN --batch 1,32 --threads 1 --json``
``--invocations`` times (each invocation: warm-up, then p50/p90 over ``--repeats`` timed calls); medians and spread
over the invocations, speed-ups within each invocation. The process (and so every child) is pinned to one CPU
(``--cpu``) so that a second core's load does not leak in. OpenVINO formats are skipped, and said so, when the
openvino extra is not installed.

Targets (issue 15): ORT INT8 / ORT fp32 >= 2.5x at batch 1 and >= 2x at batch 32 with kNN drop <= 1 point and the
INT8 cosine gate passed; the fastest format that passed its gates >= 3x ORT fp32 at batch 32.

The run defaults to the best distillation cell of results/quality.json (largest budget, then kNN).
Writes benchmarks/results/export.json.

Example: python benchmarks/export_bench.py --run benchmarks/work/quality/mobilenetv2_100/sup/compress-1q-30000-auto

``--random-weights ARCH --image-size N`` measures the runtime formats without a distilled run and without the
shared data (speed does not depend on what the weights learned): a seeded random-weight timm ``ARCH`` is exported
with distillctl's own exporter (``export_onnx``; ``Int8Quantizer`` in this CPU's default form and in the TensorRT
form, percentile calibration on random images; OpenVINO fp32 / NNCF INT8 when the extra is installed), then every
artefact is timed in this one process, each runtime's formats interleaved round by round with the ONNX Runtime
fp32 baseline, wall and process CPU time, ``--repeats`` rounds per batch. No accuracy gate applies to random
weights. Writes results/export_random_<arch>_<size>.json.
Example: python benchmarks/export_bench.py --random-weights mobilenetv2_100 --image-size 224 --repeats 30
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # --random-weights: distillctl from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (RESULTS, WORK, BenchError, display_command, distillctl, log, machine_info, read_json,  # noqa: E402
                    rel, require_shared, run_script, spread, write_json)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: python benchmarks/export_bench.py --invocations 3 --run RUN",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="Run directory (default: best cell of results/quality.json).")
    parser.add_argument("--formats", default="all", help="Bench formats (default all: every exported artefact).")
    parser.add_argument("--export-formats", default="onnx,onnx-fp16,onnx-int8,openvino,openvino-int8",
                        help="Formats exported first (OpenVINO ones dropped when the extra is missing).")
    parser.add_argument("--batch", default="1,32", help="Batch sizes.")
    parser.add_argument("--threads", type=int, default=1, help="Intra-op threads of every runtime (default 1).")
    parser.add_argument("--cpu", type=int, default=0, help="CPU the benchmark is pinned to (-1: no pinning).")
    parser.add_argument("--invocations", type=int, default=3, help="Separate `distillctl bench` processes.")
    parser.add_argument("--repeats", type=int, default=30, help="Timed calls per (format, batch) per invocation.")
    parser.add_argument("--calib-size", type=int, default=None,
                        help="INT8 calibration images (default 512; 64 random images with --random-weights).")
    parser.add_argument("--calib-method", default="auto", help="INT8 calibration: auto (default), minmax, percentile, entropy.")
    parser.add_argument("--reuse-export", action="store_true",
                        help="Skip `distillctl export` and read the run's recorded export report (after an earlier "
                             "export of the same student).")
    parser.add_argument("--quick", action="store_true", help="Use results/quality_quick.json's run; 1 invocation.")
    parser.add_argument("--out", default=None, help="Result JSON (default results/export.json).")
    parser.add_argument("--random-weights", default=None, metavar="ARCH",
                        help="Time a seeded random-weight timm ARCH exported by distillctl (no run, no shared data).")
    parser.add_argument("--image-size", type=int, default=64, help="Input size of --random-weights (default 64).")
    return parser.parse_args(argv)


def _entries(report: dict):
    for name, entry in report.items():
        if isinstance(entry, dict):
            yield name, entry
            if isinstance(entry.get("tensorrt_variant"), dict):
                yield f"{name} (TensorRT QDQ variant)", entry["tensorrt_variant"]


def best_run(quality: dict | None) -> Path | None:
    rows = [r for r in ((quality or {}).get("rows") or {}).values()
            if r.get("status") == "done" and r.get("kind") == "distill" and r.get("teacher") == "sup"]
    if not rows:
        return None
    best = max(rows, key=lambda r: (r["budget"], r.get("knn_top1") or 0))
    return WORK / "quality" / best["id"]


TARGETS = {"int8_vs_onnx_b1": 2.5, "int8_vs_onnx_b32": 2.0, "int8_max_knn_drop": 1.0, "fastest_vs_onnx_b32": 3.0}


def _openvino_available() -> bool:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _pin(cpu: int) -> list[int] | None:
    """Pin this process (and the distillctl children it starts) to one CPU; returns the affinity set."""
    if cpu < 0 or not hasattr(os, "sched_setaffinity"):
        return None
    os.sched_setaffinity(0, {cpu})
    return sorted(os.sched_getaffinity(0))


def aggregate(invocations: list[dict]) -> dict:
    """Per format@batch: p50/p90/img/s and speed-up vs ONNX Runtime fp32 and vs torch over the invocations."""
    table: dict = {}
    for payload in invocations:
        rows = payload["results"]
        by_key = {(r["format"], r["batch"]): r for r in rows}
        for (fmt, batch), row in by_key.items():
            entry = table.setdefault(f"{fmt}@{batch}", {"format": fmt, "batch": batch, "p50_ms": [], "p90_ms": [],
                                                        "images_per_sec": [], "size_mb": row.get("size_mb"),
                                                        "params": row.get("params"), "threads": row.get("threads"),
                                                        "gate": row.get("gate"), "artefact": row.get("artefact")})
            entry["p50_ms"].append(row["p50_ms"])
            if row.get("cpu_p50_ms") is not None:
                entry.setdefault("cpu_p50_ms", []).append(row["cpu_p50_ms"])
            if row.get("speedup_vs_onnx_fp32_cpu") is not None:
                entry.setdefault("speedup_vs_onnx_fp32_cpu", []).append(row["speedup_vs_onnx_fp32_cpu"])
            entry["p90_ms"].append(row["p90_ms"])
            entry["images_per_sec"].append(row["images_per_sec"])
            base = by_key.get(("torch", batch))
            if base and fmt != "torch":
                entry.setdefault("speedup_vs_torch", []).append(round(base["p50_ms"] / row["p50_ms"], 3))
            if row.get("speedup_vs_onnx_fp32") is not None:
                entry.setdefault("speedup_vs_onnx_fp32", []).append(row["speedup_vs_onnx_fp32"])
    for entry in table.values():
        for key in ("p50_ms", "p90_ms", "images_per_sec", "speedup_vs_torch", "speedup_vs_onnx_fp32", "cpu_p50_ms",
                    "speedup_vs_onnx_fp32_cpu"):
            if key in entry:
                entry[key] = {"values": entry[key], **spread(entry[key])}
    return table


def targets(table: dict, report: dict, batches: list[int]) -> dict:
    """The issue-15 targets, measured: INT8 speed-ups, kNN drop and cosine gate, fastest passing format."""
    int8 = report.get("onnx-int8") or {}
    accuracy, parity = int8.get("accuracy") or {}, int8.get("parity") or {}

    def speedup(fmt: str, batch: int) -> float | None:
        entry = table.get(f"{fmt}@{batch}") or {}
        return (entry.get("speedup_vs_onnx_fp32") or {}).get("median")

    out: dict = {"thresholds": TARGETS, "int8_form": int8.get("form"),
                 "int8_knn_drop": accuracy.get("drop"), "int8_cosine_gate_passed": parity.get("passed"),
                 "int8_accuracy_gate_passed": accuracy.get("passed")}
    def cpu_speedup(fmt: str, batch: int) -> float | None:
        entry = table.get(f"{fmt}@{batch}") or {}
        return (entry.get("speedup_vs_onnx_fp32_cpu") or {}).get("median")

    for batch in batches:
        out[f"int8_vs_onnx_b{batch}"] = speedup("onnx-int8", batch)
        # process CPU time: what a loaded machine does not inflate (wall-clock medians under load favour the shorter call)
        out[f"int8_vs_onnx_b{batch}_cpu"] = cpu_speedup("onnx-int8", batch)
    largest = max(batches)
    passing = [entry for entry in table.values() if entry["batch"] == largest and entry["gate"] == "passed"]
    if passing:
        best = max(passing, key=lambda entry: entry["images_per_sec"]["median"])
        out["fastest_b{}".format(largest)] = {"format": best["format"], "images_per_sec": best["images_per_sec"]["median"],
                                              "speedup_vs_onnx_fp32": speedup(best["format"], largest),
                                              "speedup_vs_onnx_fp32_cpu": cpu_speedup(best["format"], largest)}
    fastest = out.get(f"fastest_b{largest}") or {}
    out["met"] = {
        "int8_vs_onnx_b1": (out.get("int8_vs_onnx_b1") or 0) >= TARGETS["int8_vs_onnx_b1"],
        "int8_vs_onnx_b32": (out.get("int8_vs_onnx_b32") or 0) >= TARGETS["int8_vs_onnx_b32"],
        "int8_knn_drop": accuracy.get("drop") is not None and accuracy["drop"] <= TARGETS["int8_max_knn_drop"],
        "int8_cosine_gate": bool(parity.get("passed")),
        "fastest_vs_onnx_b32": (fastest.get("speedup_vs_onnx_fp32") or 0) >= TARGETS["fastest_vs_onnx_b32"],
    }
    return out


def random_weights_artefacts(arch: str, size: int, out_dir: Path, calib_images: int, openvino: bool) -> dict[str, dict]:
    """Export a seeded random-weight ``arch`` the way ``distillctl export`` does: ``{format: {path, ...}}``."""
    import numpy as np
    import timm
    import torch

    from distillctl.export.onnx import export_onnx
    from distillctl.export.quantize import Int8Quantizer, count_ops, default_cpu_form

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=0, exportable=True).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, out_dir / "student.onnx", size)
    calib = np.random.default_rng(0).standard_normal((calib_images, 3, size, size)).astype(np.float32)
    artefacts = {"onnx": {"path": fp32, "ops": count_ops(fp32)}}
    with Int8Quantizer(fp32, calib, workdir=out_dir) as quantizer:
        for name, form, file in (("onnx-int8", default_cpu_form(), "student.int8.onnx"),
                                 ("onnx-int8-trt", "tensorrt", "student.int8.trt.onnx")):
            info = quantizer.write(out_dir / file, method="percentile", form=form)
            artefacts[name] = {"path": Path(info.path), "form": info.form, "ops": count_ops(info.path)}
    if openvino:
        from distillctl.export.openvino import convert_ir, quantize_ir

        xml = convert_ir(fp32, out_dir / "student.openvino.xml")
        artefacts["openvino"] = {"path": xml}
        info = quantize_ir(xml, out_dir / "student.int8.openvino.xml", calib)
        artefacts["openvino-int8"] = {"path": Path(info.path), "form": "openvino-nncf"}
    return artefacts


def ort_optimised_ops(path: Path) -> dict[str, int]:
    """Op histogram of the graph ONNX Runtime actually runs (CPU EP, default optimisation level, one thread)."""
    import tempfile
    from collections import Counter

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return dict(Counter(node.op_type for node in graph.node))


def random_weights_main(args: argparse.Namespace) -> int:
    """``--random-weights``: export, then time every artefact interleaved in this process (see the module doc)."""
    import numpy as np

    from distillctl.export.bench import BASELINE, _add_speedups, runtime_groups, summarise, time_interleaved
    from distillctl.export.onnx import INPUT_NAME, ort_session

    import torch

    started = time.time()
    affinity = _pin(args.cpu)
    torch.set_num_threads(args.threads)
    args.calib_size = args.calib_size or 64
    batches = [int(b) for b in args.batch.split(",")]
    out_dir = WORK / "export_random" / f"{args.random_weights}-{args.image_size}"
    log(f"exporting random-weight {args.random_weights} at {args.image_size} px into {rel(out_dir)}")
    artefacts = random_weights_artefacts(args.random_weights, args.image_size, out_dir, args.calib_size,
                                         _openvino_available())
    runners = {}
    for name, entry in artefacts.items():
        if name.startswith("openvino"):
            from distillctl.export.openvino import ov_runner

            runners[name] = ov_runner(entry["path"], threads=args.threads)
        else:
            entry["ort_ops"] = ort_optimised_ops(entry["path"])
            session = ort_session(entry["path"], threads=args.threads, exact_int8=False)
            runners[name] = (lambda s: lambda images: s.run(None, {INPUT_NAME: images}))(session)
    load_before = [round(value, 2) for value in os.getloadavg()]
    rows = []
    for batch in batches:
        images = np.random.default_rng(0).standard_normal((batch, 3, args.image_size, args.image_size)).astype(np.float32)
        for group in runtime_groups(list(runners)):
            timed = [BASELINE] + [name for name in group if name != BASELINE]
            log(f"timing batch {batch}: {', '.join(timed)} interleaved, {args.repeats} rounds")
            timings = time_interleaved({name: (lambda r: lambda: r(images))(runners[name]) for name in timed},
                                       repeats=args.repeats, warmup=3)
            reference = summarise(timings[BASELINE][0], batch, timings[BASELINE][1])
            for name in group:
                wall, cpu = timings[name]
                rows.append({"format": name, "batch": batch, "threads": args.threads, **summarise(wall, batch, cpu),
                             "repeats": args.repeats, "form": artefacts[name].get("form"), "interleaved_with": timed,
                             "baseline_p50_ms": reference["p50_ms"], "baseline_cpu_p50_ms": reference["cpu_p50_ms"]})
    _add_speedups(rows)
    result = {"benchmark": "export-random-weights", "arch": args.random_weights, "image_size": args.image_size,
              "machine": machine_info(), "baseline": BASELINE, "timing": "interleaved",
              "command": "python benchmarks/export_bench.py " + " ".join(sys.argv[1:]),
              "threads": args.threads, "pinned_cpus": affinity, "calibration_images": args.calib_size,
              "load_average": {"before": load_before, "after": [round(value, 2) for value in os.getloadavg()]},
              "artefacts": {name: {key: (rel(value) if key == "path" else value) for key, value in entry.items()}
                            for name, entry in artefacts.items()},
              "results": rows, "elapsed_s": round(time.time() - started, 1)}
    out = Path(args.out) if args.out else RESULTS / f"export_random_{args.random_weights}_{args.image_size}.json"
    write_json(out, result)
    for row in rows:
        log(f"{row['format']:14s} b{row['batch']:<3d} wall p50 {row['p50_ms']:9.3f} ms ({row['speedup_vs_onnx_fp32']:.2f}x) "
            f"cpu p50 {row['cpu_p50_ms']:9.3f} ms ({row['speedup_vs_onnx_fp32_cpu']:.2f}x)")
    log(f"done in {result['elapsed_s']:.0f} s → {out}; load average {load_before} → {result['load_average']['after']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.random_weights:
        return random_weights_main(args)
    require_shared()
    args.calib_size = args.calib_size or 512
    started = time.time()
    if args.quick:
        args.invocations, args.repeats, args.calib_size = 1, 5, 64
    quality = read_json(RESULTS / ("quality_quick.json" if args.quick else "quality.json"))
    run = Path(args.run) if args.run else best_run(quality)
    if run is None or not (run / "student" / "model.safetensors").is_file():
        print("error: no distilled run to export; run benchmarks/quality.py first or pass --run", file=sys.stderr)
        return 2
    affinity = _pin(args.cpu)
    load_before = [round(value, 2) for value in os.getloadavg()]
    log_path = WORK / "export.log"
    WORK.mkdir(parents=True, exist_ok=True)
    export_formats = [f for f in args.export_formats.split(",") if f]
    skipped = []
    if not _openvino_available():
        skipped = [f for f in export_formats if f.startswith("openvino")]
        export_formats = [f for f in export_formats if not f.startswith("openvino")]
        if skipped:
            log(f"openvino extra not installed: skipping {', '.join(skipped)} (pip install 'distillctl[openvino]')")
    export_cmd = ["export", rel(run), "--format", ",".join(export_formats), "--calib-size", str(args.calib_size),
                  "--calib-method", args.calib_method]
    log(f"distillctl {display_command(export_cmd)}")
    gate_error = None
    try:
        if args.reuse_export:
            report = (read_json(run / "summary.json") or {}).get("export") or {}
            if not report.get("onnx-int8"):
                raise BenchError(f"--reuse-export: {run}/summary.json has no export report", 2)
        else:
            report = distillctl(export_cmd, log_path, threads=args.threads)
    except BenchError as exc:
        if exc.returncode != 3:
            raise
        # a parity/accuracy gate failed (exit 3): the artefacts and the measured report are still written
        # (summary.json's export section); record the failure and go on to the latency measurement
        gate_error = str(exc)
        report = (read_json(run / "summary.json") or {}).get("export") or {}
        log(f"export gate failed (recorded): {gate_error}")
    export_s = round(time.time() - started, 1)
    bench_cmd = ["bench", rel(run), "--formats", args.formats, "--batch", args.batch, "--threads", str(args.threads),
                 "--repeats", str(args.repeats)]
    invocations = []
    for i in range(args.invocations):
        log(f"bench invocation {i + 1}/{args.invocations}")
        invocations.append(distillctl(bench_cmd, log_path, threads=args.threads))
    table = aggregate(invocations)
    batches = [int(b) for b in args.batch.split(",")]
    int8 = report.get("onnx-int8") or {}
    failed = [f"{name}: {'; '.join(entry['parity']['failures'])}" for name, entry in _entries(report)
              if (entry.get("parity") or {}).get("failures")]
    if failed and gate_error is None:
        gate_error = "export gates failed (recorded report): " + " | ".join(failed)
    result = {"benchmark": "export", "run": rel(run), "machine": machine_info(),
              "command": "python benchmarks/export_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "export_command": "distillctl " + display_command(export_cmd),
              "bench_command": "distillctl " + display_command(bench_cmd),
              "threads": args.threads, "pinned_cpus": affinity, "skipped_formats": skipped,
              "load_average": {"before": load_before, "after": [round(value, 2) for value in os.getloadavg()]},
              "export_report": report, "int8_accuracy": int8.get("accuracy"), "gate_error": gate_error,
              "parity": {name: (entry.get("parity") or {}) for name, entry in _entries(report)},
              "latency": table, "targets": targets(table, report, batches),
              "fastest": [payload.get("fastest") for payload in invocations],
              "invocations": [payload["results"] for payload in invocations],
              "export_s": export_s, "elapsed_s": round(time.time() - started, 1)}
    out = Path(args.out) if args.out else RESULTS / ("export_quick.json" if args.quick else "export.json")
    write_json(out, result)
    log(f"export benchmark done in {result['elapsed_s']:.0f} s → {out}; targets met: {result['targets']['met']}")
    return 0


if __name__ == "__main__":
    run_script(main)
