"""Export benchmark: CPU latency of the distilled benchmark student as PyTorch eager fp32, ONNX Runtime
fp32 and ONNX Runtime INT8 at batch 1 and 32, and the INT8 kNN accuracy delta vs fp32.

Uses the real CLI: ``distillctl export RUN --format onnx,onnx-int8 --json`` (parity gates, INT8
calibration on the run's training images, kNN of the INT8 artefact vs fp32), then
``distillctl bench RUN --formats torch,onnx,onnx-int8 --batch 1,32 --json`` ``--invocations`` times
(each invocation: warm-up, then p50/p90 over ``--repeats`` timed calls); medians and spread over the
invocations, ratios within each invocation.

The run defaults to the best distillation cell of results/quality.json (largest budget, then kNN).
Writes benchmarks/results/export.json.

Example: python benchmarks/export_bench.py --invocations 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (RESULTS, WORK, BenchError, display_command, distillctl, log, machine_info, read_json,  # noqa: E402
                    rel, require_shared, spread, write_json)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: python benchmarks/export_bench.py --invocations 3",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="Run directory (default: best cell of results/quality.json).")
    parser.add_argument("--formats", default="torch,onnx,onnx-int8", help="Bench formats.")
    parser.add_argument("--batch", default="1,32", help="Batch sizes.")
    parser.add_argument("--invocations", type=int, default=3, help="Separate `distillctl bench` processes.")
    parser.add_argument("--repeats", type=int, default=30, help="Timed calls per (format, batch) per invocation.")
    parser.add_argument("--calib-size", type=int, default=256, help="INT8 calibration images.")
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
    log_path = WORK / "export.log"
    formats = [f for f in args.formats.split(",") if f != "torch"]
    # --max-drop 100: the benchmark reports the INT8 delta; the default 1-point gate is the product's job
    export_cmd = ["export", rel(run), "--format", ",".join(formats), "--calib-size", str(args.calib_size),
                  "--calib-method", args.calib_method, "--max-drop", "100"]
    log(f"distillctl {display_command(export_cmd)}")
    gate_error = None
    try:
        if args.reuse_export:
            report = (read_json(run / "summary.json") or {}).get("export") or {}
            if not report.get("onnx-int8"):
                raise BenchError(f"--reuse-export: {run}/summary.json has no export report", 2)
        else:
            report = distillctl(export_cmd, log_path)
    except BenchError as exc:
        if exc.returncode != 3:
            raise
        # a parity/accuracy gate failed (exit 3): the artefacts and the measured report are still written
        # (summary.json's export section); record the failure and go on to the latency measurement
        gate_error = str(exc)
        report = (read_json(run / "summary.json") or {}).get("export") or {}
        log(f"export gate failed (recorded): {gate_error}")
    bench_cmd = ["bench", rel(run), "--formats", args.formats, "--batch", args.batch, "--repeats", str(args.repeats)]
    invocations = []
    for i in range(args.invocations):
        log(f"bench invocation {i + 1}/{args.invocations}")
        invocations.append(distillctl(bench_cmd, log_path)["results"])
    table: dict = {}
    for rows in invocations:
        by_key = {(r["format"], r["batch"]): r for r in rows}
        for (fmt, batch), row in by_key.items():
            entry = table.setdefault(f"{fmt}@{batch}", {"format": fmt, "batch": batch, "p50_ms": [], "p90_ms": [],
                                                        "images_per_sec": [], "size_mb": row.get("size_mb"),
                                                        "params": row.get("params"), "threads": row.get("torch_threads")})
            entry["p50_ms"].append(row["p50_ms"])
            entry["p90_ms"].append(row["p90_ms"])
            entry["images_per_sec"].append(row["images_per_sec"])
            base = by_key.get(("torch", batch))
            onnx = by_key.get(("onnx", batch))
            if base and fmt != "torch":
                entry.setdefault("speedup_vs_torch", []).append(round(base["p50_ms"] / row["p50_ms"], 3))
            if onnx and fmt == "onnx-int8":
                entry.setdefault("speedup_vs_onnx_fp32", []).append(round(onnx["p50_ms"] / row["p50_ms"], 3))
    for entry in table.values():
        for key in ("p50_ms", "p90_ms", "images_per_sec", "speedup_vs_torch", "speedup_vs_onnx_fp32"):
            if key in entry:
                entry[key] = {"values": entry[key], **spread(entry[key])}
    int8 = report.get("onnx-int8") or {}
    failed = [f"{name}: {'; '.join(entry['parity']['failures'])}" for name, entry in _entries(report)
              if (entry.get("parity") or {}).get("failures")]
    if failed and gate_error is None:
        gate_error = "export gates failed (recorded report): " + " | ".join(failed)
    result = {"benchmark": "export", "run": rel(run), "machine": machine_info(),
              "command": "python benchmarks/export_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "export_command": "distillctl " + display_command(export_cmd),
              "bench_command": "distillctl " + display_command(bench_cmd),
              "export_report": report, "int8_accuracy": int8.get("accuracy"), "gate_error": gate_error,
              "parity": {name: (entry.get("parity") or {}) for name, entry in _entries(report)},
              "latency": table, "invocations": invocations, "elapsed_s": round(time.time() - started, 1)}
    out = Path(args.out) if args.out else RESULTS / ("export_quick.json" if args.quick else "export.json")
    write_json(out, result)
    log(f"export benchmark done in {result['elapsed_s']:.0f} s → {out}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1)
