"""OpenVINO artefacts, the onnxslim clean-up, missing extras (exit 2) and `distillctl bench --json`.

The OpenVINO tests skip cleanly when the ``openvino`` extra (openvino + nncf) is not installed; the
missing-extra behaviour is tested everywhere by making the import fail.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from distillctl.errors import UsageError

DATA = "builtin:digits"


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


requires_openvino = pytest.mark.skipif(not (_has("openvino") and _has("nncf")),
                                       reason="the openvino extra (openvino, nncf) is not installed")
requires_onnxslim = pytest.mark.skipif(not _has("onnxslim"), reason="the slim extra (onnxslim) is not installed")


def _cli(args: list[str]) -> int:
    from distillctl.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
        raise SystemExit(0)
    return int(info.value.code)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "student", copy / "student")
    shutil.copy(run_dir / "summary.json", copy / "summary.json")
    return copy


@pytest.mark.parametrize("module", ["openvino", "nncf"])
def test_missing_openvino_extra_exits_2_with_install_hint(run_dir: Path, monkeypatch, capsys, module: str) -> None:
    from distillctl.export.openvino import require_openvino

    monkeypatch.setitem(sys.modules, module, None)  # import fails as on a machine without the extra
    with pytest.raises(UsageError) as info:
        require_openvino()
    assert "distillctl[openvino]" in info.value.hint and info.value.exit_code == 2
    code = _cli(["export", str(run_dir), "--format", "onnx,openvino-int8", "--data", DATA])
    err = capsys.readouterr().err
    assert code == 2 and "OpenVINO extra" in err and "pip install 'distillctl[openvino]'" in err
    assert not (run_dir / "export" / "student.int8.openvino.xml").exists()


def test_missing_onnxslim_exits_2_with_install_hint(run_dir: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxslim", None)
    code = _cli(["export", str(run_dir), "--format", "onnx", "--slim", "--data", DATA])
    err = capsys.readouterr().err
    assert code == 2 and "onnxslim" in err and "distillctl[slim]" in err


@requires_onnxslim
def test_slim_is_kept_only_when_it_passes_parity(run_dir: Path, tmp_path: Path) -> None:
    from distillctl.export.api import export_config, export_run

    run = _copy(run_dir, tmp_path)
    report = export_run(run, export_config(["onnx"], parity_images=16, slim=True), data=DATA)
    slim = report["onnx"]["slim"]
    assert slim["applied"] is True and slim["parity"]["passed"] is True
    assert 0 < slim["nodes_after"] <= slim["nodes_before"]
    assert report["onnx"]["parity"]["passed"] is True
    assert not list((run / "export").glob(".*slim*"))


@requires_openvino
def test_openvino_fp32_and_int8_gated_and_carded(run_dir: Path, tmp_path: Path) -> None:
    from distillctl.export.api import export_config, export_run
    from distillctl.export.openvino import read_ir_metadata

    run = _copy(run_dir, tmp_path)
    report = export_run(run, export_config(["onnx", "openvino", "openvino-int8"], calib_size=64, parity_images=24,
                                           max_drop=5.0), data=DATA)
    fp32, int8 = report["openvino"], report["openvino-int8"]
    assert fp32["parity"]["passed"] and fp32["parity"]["tolerance"]["name"] == "fp32"
    assert fp32["parity"]["max_abs"] < 1e-3
    assert int8["parity"]["tolerance"]["name"] == "int8" and int8["parity"]["mean_cosine"] > 0.98
    accuracy = int8["accuracy"]
    assert accuracy["passed"] and accuracy["protocol"]["runtime"].startswith("OpenVINO")
    assert accuracy["drop"] == pytest.approx(accuracy["reference_top1"] - accuracy["candidate_top1"], abs=1e-3)
    assert int8["quantization"]["fake_quantize"] > 0 and int8["quantization"]["calibration_images"] == 64
    export_dir = run / "export"
    for name in ("student.openvino", "student.int8.openvino"):
        assert (export_dir / f"{name}.xml").is_file() and (export_dir / f"{name}.bin").is_file()
    card = json.loads((export_dir / "model_card.json").read_text())
    assert {"student.openvino.xml", "student.openvino.bin", "student.int8.openvino.bin"} <= set(card["artifacts"])
    assert card["quantization"]["openvino"]["calibration"]["tried"]
    embedded = read_ir_metadata(export_dir / "student.int8.openvino.xml")
    assert json.loads(embedded["distillctl.artifact"])["int8"]["form"] == "openvino-nncf"
    assert json.loads(embedded["distillctl.teacher"]) == card["teacher"]
    assert not list(export_dir.glob(".int8-try-*")) and not list(export_dir.glob(".ov-*"))


def test_bench_json_schema_and_fastest_passing_format(run_dir: Path, tmp_path: Path, capsys) -> None:
    from distillctl.export.api import export_config, export_run

    run = _copy(run_dir, tmp_path)
    export_run(run, export_config(["onnx", "onnx-int8"], calib_size=32, parity_images=16, max_drop=5.0,
                                  calib_method="minmax"), data=DATA)
    code = _cli(["bench", str(run), "--batch", "1,2", "--threads", "1", "--repeats", "2", "--warmup", "0", "--json"])
    out = capsys.readouterr().out
    payload = json.loads(out)  # exactly one JSON object on stdout
    assert code == 0 and payload["schema"] == "distillctl-bench/2" and payload["baseline"] == "onnx"
    formats = ["torch", "onnx", "onnx-int8", "onnx-int8-trt"]
    assert [(r["format"], r["batch"]) for r in payload["results"]] == [(f, b) for f in formats for b in (1, 2)]
    for row in payload["results"]:
        assert row["threads"] == 1 and 0 < row["p50_ms"] <= row["p90_ms"] and row["images_per_sec"] > 0
        assert row["gate"] == ("reference" if row["format"] == "torch" else "passed")
        assert row["timing"] == "interleaved" and row["cpu_p50_ms"] > 0 and row["speedup_vs_onnx_fp32_cpu"] > 0
        assert row["interleaved_with"] == (["onnx", "torch"] if row["format"] == "torch" else formats[1:])
        if row["format"] == "onnx":
            assert row["speedup_vs_onnx_fp32"] == 1.0 and row["speedup_vs_onnx_fp32_cpu"] == 1.0
    fastest = payload["fastest"]
    assert [(f["threads"], f["batch"]) for f in fastest] == [(1, 1), (1, 2)]
    for best in fastest:
        rows = [r for r in payload["results"] if r["batch"] == best["batch"]]
        assert best["images_per_sec"] == max(r["images_per_sec"] for r in rows)


def test_fastest_skips_formats_that_failed_their_gate() -> None:
    from distillctl.export.bench import _add_speedups, fastest

    def row(fmt, batch, ips, gate):
        return {"format": fmt, "batch": batch, "threads": 1, "images_per_sec": ips, "p50_ms": batch * 1000 / ips,
                "gate": gate}

    rows = [row("onnx", 1, 100, "passed"), row("onnx-int8", 1, 400, "failed"), row("openvino-int8", 1, 300, "passed"),
            row("onnx-fp16", 1, 500, "not-gated"), row("torch", 1, 50, "reference")]
    _add_speedups(rows)
    [best] = fastest(rows)
    assert best["format"] == "openvino-int8" and best["speedup_vs_onnx_fp32"] == 3.0


def test_bench_usage_errors(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert _cli(["bench", str(run_dir), "--formats", "tflite"]) == 2
    assert _cli(["bench", str(run_dir), "--threads", "0"]) == 2
    assert _cli(["bench", str(run_dir), "--formats", "openvino", "--batch", "1"]) == 2  # not exported
    err = capsys.readouterr().err
    assert "--format openvino" in err
    empty = _copy(run_dir, tmp_path)
    assert _cli(["bench", str(empty)]) == 2 and "no exported artefacts" in capsys.readouterr().err


@requires_openvino
def test_latency_gate_measures_an_openvino_artefact(run_dir: Path, tmp_path: Path) -> None:
    from distillctl.export.api import export_config, export_run
    from distillctl.gates import GatesConfig, LatencyGateSpec, evaluate_gates

    run = _copy(run_dir, tmp_path)
    export_run(run, export_config(["onnx", "openvino"], parity_images=8), data=DATA)
    gates = GatesConfig(max_latency_ms=1e4, latency=LatencyGateSpec(format="openvino", repeats=3, warmup=1))
    [result] = evaluate_gates(gates, json.loads((run / "summary.json").read_text()), run)
    assert result.passed and 0 < result.measured < 1e4
    assert "openvino batch 1 on 1 thread" in result.detail and "OpenVINO" in result.detail


@requires_openvino
def test_bundle_verify_runs_openvino_parity_and_says_when_it_cannot(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from distillctl.export.api import export_config, export_run
    from distillctl.export.bundle import verify_bundle, write_bundle

    run = _copy(run_dir, tmp_path)
    (run / "recipe.yaml").write_text(f"data: {{train: '{DATA}', image_size: 32, crop_pct: 1.0}}\n")  # its eval data
    export_run(run, export_config(["onnx", "openvino"], parity_images=8), data=DATA)
    out = tmp_path / "bundle"
    write_bundle(run, out, samples=4)
    samples = json.loads((out / "samples" / "samples.json").read_text())
    assert samples["tolerances"]["model/student.openvino.xml"] == "fp32"
    report = verify_bundle(out)
    assert report["parity"]["model/student.openvino.xml"]["min_cosine"] > 0.9999
    monkeypatch.setitem(sys.modules, "openvino", None)  # a receiving machine without the extra
    report = verify_bundle(out)
    entry = report["parity"]["model/student.openvino.xml"]
    assert report["passed"] and entry["passed"] is None and "distillctl[openvino]" in entry["skipped"]
    assert report["parity"]["model/student.onnx"]["passed"] is True


OV_REPORT = """Check 'false' failed at src/frontends/common_translators/src/unconverted_ops_report.cpp:151:
FrontEnd API failed with OpConversionFailure:
Model wasn't fully converted. Failed operations detailed log:
-- AveragePool-20 with a message:
[ONNX Frontend] Conversion failed for AveragePool-20
While validating ONNX node '<Node(AveragePool): /layer4/layer4.0/downsample/downsample.0/AveragePool_output_0>': Check 'cmp::le(kernel, dim.get_length())' failed at pooling_shape_inference_util.hpp:149:
Kernel after dilation has size (dim: 2) larger than the data shape after padding (dim: 1) at axis 0.

-- Conv-20 with a message:
The input data tensor's rank has to be known (static)

Summary:
-- Conversion is failed for: AveragePool-20, Conv-20
"""


def test_openvino_conversion_report_becomes_one_line() -> None:
    from distillctl.export.openvino import conversion_failure

    line = conversion_failure(OV_REPORT)
    assert line == ("operators AveragePool-20, Conv-20: Kernel after dilation has size (dim: 2) larger than the data "
                    "shape after padding (dim: 1) at axis 0")
    assert conversion_failure("") == "the graph: no reason given"


@requires_openvino
def test_a_graph_openvino_rejects_exits_2_in_one_line(tmp_path: Path, capsys) -> None:
    from tests.export.conftest import make_run_dir

    # test_resnet at 16 px: layer4's 2x2 average-pool downsample meets a 1x1 map, which OpenVINO's ONNX frontend
    # refuses (onnxruntime runs it); the ONNX export itself passes its gate
    run = make_run_dir(tmp_path)
    config = json.loads((run / "student" / "config.json").read_text())
    (run / "student" / "config.json").write_text(json.dumps({**config, "input_size": [3, 16, 16]}))
    code = _cli(["export", str(run), "--format", "onnx,openvino", "--data", DATA])
    err = capsys.readouterr().err
    assert code == 2, err
    message = [line for line in err.splitlines() if "cannot convert" in line]
    assert len(message) == 1 and "AveragePool" in message[0] and "Traceback" not in err
    assert "--image-size" in err  # the hint
    assert not list(run.glob("export/*.openvino.*"))
