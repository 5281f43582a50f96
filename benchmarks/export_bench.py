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
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (RESULTS, WORK, BenchError, display_command, distillctl, log, machine_info, read_json,  # noqa: E402
                    rel, require_shared, spread, write_json)


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
    parser.add_argument("--calib-size", type=int, default=512, help="INT8 calibration images.")
    parser.add_argument("--calib-method", default="auto", help="INT8 calibration: auto (default), minmax, percentile, entropy.")
    parser.add_argument("--reuse-export", action="store_true",
                        help="Skip `distillctl export` and read the run's recorded export report (after an earlier "
                             "export of the same student).")
    parser.add_argument("--quick", action="store_true", help="Use results/quality_quick.json's run; 1 invocation.")
    parser.add_argument("--out", default=None, help="Result JSON (default results/export.json).")
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
            entry["p90_ms"].append(row["p90_ms"])
            entry["images_per_sec"].append(row["images_per_sec"])
            base = by_key.get(("torch", batch))
            if base and fmt != "torch":
                entry.setdefault("speedup_vs_torch", []).append(round(base["p50_ms"] / row["p50_ms"], 3))
            if row.get("speedup_vs_onnx_fp32") is not None:
                entry.setdefault("speedup_vs_onnx_fp32", []).append(row["speedup_vs_onnx_fp32"])
    for entry in table.values():
        for key in ("p50_ms", "p90_ms", "images_per_sec", "speedup_vs_torch", "speedup_vs_onnx_fp32"):
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
    for batch in batches:
        out[f"int8_vs_onnx_b{batch}"] = speedup("onnx-int8", batch)
    largest = max(batches)
    passing = [entry for entry in table.values() if entry["batch"] == largest and entry["gate"] == "passed"]
    if passing:
        best = max(passing, key=lambda entry: entry["images_per_sec"]["median"])
        out["fastest_b{}".format(largest)] = {"format": best["format"], "images_per_sec": best["images_per_sec"]["median"],
                                              "speedup_vs_onnx_fp32": speedup(best["format"], largest)}
    fastest = out.get(f"fastest_b{largest}") or {}
    out["met"] = {
        "int8_vs_onnx_b1": (out.get("int8_vs_onnx_b1") or 0) >= TARGETS["int8_vs_onnx_b1"],
        "int8_vs_onnx_b32": (out.get("int8_vs_onnx_b32") or 0) >= TARGETS["int8_vs_onnx_b32"],
        "int8_knn_drop": accuracy.get("drop") is not None and accuracy["drop"] <= TARGETS["int8_max_knn_drop"],
        "int8_cosine_gate": bool(parity.get("passed")),
        "fastest_vs_onnx_b32": (fastest.get("speedup_vs_onnx_fp32") or 0) >= TARGETS["fastest_vs_onnx_b32"],
    }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_shared()
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
    try:
        raise SystemExit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1)
