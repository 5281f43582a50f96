"""benchmarks/export_bench.py --random-weights: export with distillctl's exporter and interleaved timing, without
../shared (tiny timm model at 32 px, 2 rounds; the numbers are not checked, only what the result records)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_random_weights_mode_needs_no_shared_data_and_records_forms_and_graphs(tmp_path: Path) -> None:
    env = {**os.environ, "DISTILLCTL_SHARED": str(tmp_path / "nowhere"), "DISTILLCTL_BENCH_WORK": str(tmp_path / "w"),
           "DISTILLCTL_BENCH_RESULTS": str(tmp_path / "r"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/export_bench.py", "--random-weights", "test_resnet",
                           "--image-size", "32", "--batch", "1,2", "--repeats", "2", "--calib-size", "4", "--cpu", "-1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r" / "export_random_test_resnet_32.json").read_text())
    assert result["timing"] == "interleaved" and result["calibration_images"] == 4 and result["image_size"] == 32
    artefacts = result["artefacts"]
    assert artefacts["onnx-int8"]["form"] == "qdq-u8s8" and artefacts["onnx-int8-trt"]["form"] == "tensorrt"
    # what ONNX Runtime runs: the CPU form fuses into integer kernels, the fp32 graph has none
    assert artefacts["onnx-int8"]["ort_ops"]["QLinearConv"] == artefacts["onnx"]["ops"]["Conv"]
    assert "QLinearConv" not in artefacts["onnx"]["ort_ops"]
    rows = {(row["format"], row["batch"]): row for row in result["results"]}
    assert {fmt for fmt, _ in rows} >= {"onnx", "onnx-int8", "onnx-int8-trt"} and {b for _, b in rows} == {1, 2}
    for (fmt, _), row in rows.items():
        assert row["repeats"] == 2 and row["p50_ms"] > 0 and row["cpu_p50_ms"] > 0
        if fmt == "onnx":
            assert row["speedup_vs_onnx_fp32"] == 1.0 and row["speedup_vs_onnx_fp32_cpu"] == 1.0


def test_export_table_and_targets_carry_cpu_time_speedups() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from export_bench import aggregate, targets

    def row(fmt, p50, cpu, speedup, speedup_cpu, gate="passed"):
        return {"format": fmt, "batch": 1, "p50_ms": p50, "p90_ms": p50, "images_per_sec": 1000 / p50, "gate": gate,
                "cpu_p50_ms": cpu, "speedup_vs_onnx_fp32": speedup, "speedup_vs_onnx_fp32_cpu": speedup_cpu}

    invocations = [{"results": [row("onnx", 1.0, 0.5, 1.0, 1.0), row("onnx-int8", 0.25, 0.25, 4.0, 2.0)]},
                   {"results": [row("onnx", 0.6, 0.5, 1.0, 1.0), row("onnx-int8", 0.3, 0.25, 2.0, 2.0)]}]
    table = aggregate(invocations)
    assert table["onnx-int8@1"]["cpu_p50_ms"]["median"] == 0.25
    assert table["onnx-int8@1"]["speedup_vs_onnx_fp32_cpu"]["values"] == [2.0, 2.0]
    report = {"onnx-int8": {"form": "qdq-u8s8", "parity": {"passed": True}, "accuracy": {"drop": 0.1, "passed": True}}}
    out = targets(table, report, [1])
    assert out["int8_vs_onnx_b1"] == 3.0 and out["int8_vs_onnx_b1_cpu"] == 2.0
    assert out["fastest_b1"]["format"] == "onnx-int8" and out["fastest_b1"]["speedup_vs_onnx_fp32_cpu"] == 2.0
