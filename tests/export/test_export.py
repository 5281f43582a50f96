"""Export stage end to end on a tiny student: ONNX + fp16 + INT8 (both variants), gates, card, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from distillctl.errors import GateError, UsageError
from distillctl.export.api import export_config, export_run
from distillctl.export.card import metadata_to_card
from distillctl.export.onnx import default_opset, export_onnx, ort_session, read_metadata, verify_onnx
from distillctl.export.parity import check_parity, ort_runner
from distillctl.export.quantize import check_tensorrt_compatible, count_ops, tensorrt_incompatibilities
from distillctl.students import load_student

DATA = "builtin:digits"


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> dict:
    """One real export of every CPU format, shared by the tests of this module.

    The fixture student has random weights; its INT8 kNN drop on digits is about 1 point, so the
    budget here is 3 points (the budget gate itself is tested with an impossible value below).
    """
    return export_run(run_dir, export_config(["onnx", "onnx-fp16", "onnx-int8"], calib_size=256, parity_images=48,
                                             max_drop=3.0), data=DATA)


def _copy_student(run_dir: Path, tmp_path: Path, with_recipe: bool = False) -> Path:
    """A fresh run dir with the same student and summary (no export yet), optionally a resolved recipe."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "student", copy / "student")
    shutil.copy(run_dir / "summary.json", copy / "summary.json")
    if with_recipe:
        from distillctl.config import build_recipe
        from distillctl.rundir import RunDir

        RunDir(copy).write_recipe(build_recipe({"data": {"train": DATA, "image_size": 32, "crop_pct": 1.0}}))
    return copy


def _cli(args: list[str]) -> int:
    from distillctl.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
        raise SystemExit(0)
    return int(info.value.code)


def test_onnx_opset_names_and_dynamic_batch(run_dir: Path, exported: dict) -> None:
    path = run_dir / exported["onnx"]["path"]
    assert exported["onnx"]["opset"] == 18 and default_opset(path) == 18
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["embedding"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not list(path.parent.glob("*.data")), "export must be one self-contained file"
    model, _ = load_student(run_dir)
    session = ort_session(path)
    for batch in (1, 3, 7):
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        (ours,) = session.run(None, {"input": images.numpy()})
        with torch.no_grad():
            reference = model(images).numpy()
        assert ours.shape == (batch, 96)
        np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


def test_parity_numbers_in_report_summary_and_card(run_dir: Path, exported: dict) -> None:
    parity = exported["onnx"]["parity"]
    assert parity["passed"] and parity["batches"] == [1, 3, 32] and parity["images"] == 48
    assert parity["max_abs"] <= 1e-4 * max(1.0, parity["ref_abs_max"]) and parity["min_cosine"] >= 0.99999
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["distillctl_version"] == "0.1.0" and summary["teacher"]["knn_top1"] == 90.0  # other keys kept
    assert summary["export"]["onnx"]["parity"]["min_cosine"] == parity["min_cosine"]
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    assert card["teacher"] == {"name": "fixture-teacher", "sha256": "0" * 64, "license": "apache-2.0"}
    assert card["method"] == "simreg" and card["export"]["opset"] == 18
    assert {"torch", "onnx", "onnxruntime", "distillctl"} <= set(card["export"]["versions"])
    assert card["parity"]["onnx"]["max_abs"] == parity["max_abs"]
    assert card["eval"]["student_knn_top1"] == 80.0 and "onnx-int8_knn" in card["eval"]
    assert len(card["data"]["train_manifest_sha256"]) == 64
    for name, entry in card["artifacts"].items():  # hashes describe the files as written
        from distillctl.export.card import sha256_file

        assert sha256_file(run_dir / "export" / name) == entry["sha256"]
    embedded = metadata_to_card(read_metadata(run_dir / "export" / "student.onnx"))
    assert embedded["teacher"] == card["teacher"] and embedded["parity"] == card["parity"]
    assert json.loads(read_metadata(run_dir / "export" / "student.int8.onnx")["distillctl.input.mean"]) == [0.5] * 3


def test_int8_qdq_tensorrt_variant_and_accuracy(run_dir: Path, exported: dict) -> None:
    int8 = exported["onnx-int8"]
    plain, trt = run_dir / int8["path"], run_dir / int8["tensorrt_variant"]["path"]
    for path in (plain, trt):
        ops = count_ops(path)
        assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    assert tensorrt_incompatibilities(trt) == []
    check_tensorrt_compatible(trt)
    problems = tensorrt_incompatibilities(plain)  # the x86 CPU form: uint8 activation zero-points
    assert any("zero-point dtype uint8" in p for p in problems)
    with pytest.raises(GateError, match="not TensorRT-compatible"):
        check_tensorrt_compatible(plain)
    zero_points = [numpy_helper.to_array(i) for i in onnx.load(str(trt)).graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    for entry in (int8, int8["tensorrt_variant"]):
        accuracy = entry["accuracy"]
        assert accuracy["k"] == 20 and accuracy["max_drop"] == 3.0 and accuracy["passed"]
        assert accuracy["candidate"] == Path(entry["path"]).name  # not the name it was tried under
        assert accuracy["drop"] == pytest.approx(accuracy["reference_top1"] - accuracy["candidate_top1"], abs=1e-3)
        assert 10.0 < accuracy["candidate_top1"] <= 100.0  # far above chance on digits
        assert entry["parity"]["tolerance"]["name"] == "int8" and entry["parity"]["mean_cosine"] >= 0.98
    assert exported["passed"] is True


def test_int8_form_recorded_in_file_report_and_card(run_dir: Path, exported: dict) -> None:
    import platform

    from distillctl.export.quantize import default_cpu_form

    int8 = exported["onnx-int8"]
    expected = default_cpu_form()
    assert expected == ("qdq-u8s8" if platform.machine() == "x86_64" else "qdq-s8s8")
    assert int8["form"] == expected and int8["tensorrt_variant"]["form"] == "tensorrt"
    for entry, form in ((int8, expected), (int8["tensorrt_variant"], "tensorrt")):
        artifact = json.loads(read_metadata(run_dir / entry["path"])["distillctl.artifact"])
        assert artifact["int8"]["form"] == form and artifact["file"] == Path(entry["path"]).name
        assert artifact["int8"]["per_channel"] is True
    assert json.loads(read_metadata(run_dir / exported["onnx"]["path"])["distillctl.artifact"]) == \
        {"format": "onnx", "file": "student.onnx"}
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    forms = card["quantization"]["forms"]
    assert forms["student.int8.onnx"]["activation_type"] == ("QUInt8" if expected == "qdq-u8s8" else "QInt8")
    assert forms["student.int8.trt.onnx"]["symmetric"] is True
    calibration = card["quantization"]["calibration"]
    assert calibration["requested"] == "auto" and calibration["method"] in ("minmax", "percentile", "entropy")
    for name in ("student.int8.onnx", "student.int8.trt.onnx"):
        selection = calibration["selection"][name]
        assert selection["tried"] and all("mean_cosine" in t for t in selection["tried"])
        assert selection["method"] == card["quantization"][name]["calibration_method"]
    assert "kNN" in calibration["decided_by"]


def test_fp16_keeps_float32_io(run_dir: Path, exported: dict) -> None:
    path = run_dir / exported["onnx-fp16"]["path"]
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)
    assert exported["onnx-fp16"]["parity"]["passed"] and exported["onnx-fp16"]["parity"]["tolerance"]["name"] == "fp16"


def test_tampered_onnx_fails_parity_with_exit_3(run_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """An exporter that writes a wrong graph (one Conv weight scaled) must be caught, not shipped silently."""
    import distillctl.export.api as api

    real_export = api.export_onnx

    def tampering_export(model, out_path, input_size, **kwargs):
        path = real_export(model, out_path, input_size, **kwargs)
        proto = onnx.load(str(path))
        conv_weights = {node.input[1] for node in proto.graph.node if node.op_type == "Conv"}
        init = next(i for i in proto.graph.initializer if i.name in conv_weights)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
        onnx.save(proto, str(path))
        return path

    monkeypatch.setattr(api, "export_onnx", tampering_export)
    run = _copy_student(run_dir, tmp_path, with_recipe=True)  # labelled data comes from the run's recipe
    code = _cli(["export", str(run), "--format", "onnx,onnx-int8", "--parity-images", "16", "--json"])
    captured = capsys.readouterr()
    assert code == 3
    assert "parity gate failed for student.onnx" in captured.err and "over" in captured.err and "min cosine" in captured.err
    report = json.loads(captured.out)  # the numbers are still reported, as one JSON object
    assert report["onnx"]["parity"]["passed"] is False and report["onnx"]["parity"]["max_abs"] > 1e-3
    assert report["onnx-int8"] == {"skipped": "the fp32 ONNX failed its parity gate"}
    card = json.loads((run / "export" / "model_card.json").read_text())
    assert card["parity"]["onnx"]["passed"] is False
    assert card["data"]["train"] == DATA and card["data"]["crop_pct"] == 1.0  # read from recipe.yaml


def test_parity_gate_direct_on_tampered_file(run_dir: Path, exported: dict, tmp_path: Path) -> None:
    model, _ = load_student(run_dir)
    proto = onnx.load(str(run_dir / exported["onnx"]["path"]))
    last_conv = [n for n in proto.graph.node if n.op_type == "Conv"][-1].input[1]
    for init in proto.graph.initializer:
        if init.name == last_conv:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = check_parity(model, ort_runner(tampered), images)
    assert not result.passed and result.max_abs > 1e-4
    with pytest.raises(GateError, match=r"max\|Δ\| .* > .*× over"):
        result.raise_if_failed("tampered.onnx")


def test_impossible_int8_budget_exits_3(run_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from distillctl.export import accuracy

    run = _copy_student(run_dir, tmp_path)
    args = ["export", str(run), "--format", "onnx-int8", "--data", DATA, "--calib-size", "64",
            "--calib-method", "percentile", "--parity-images", "16"]
    assert _cli([*args, "--max-drop=-100"]) == 2  # the recipe's domain: a budget is >= 0 points
    capsys.readouterr()
    real = accuracy.compare_knn  # a budget no artefact meets, handed to the real kNN judge
    monkeypatch.setattr(accuracy, "compare_knn", lambda *a, **k: real(*a, **{**k, "max_drop": -100.0}))
    code = _cli([*args, "--max-drop", "0"])
    err = capsys.readouterr().err
    assert code == 3 and "INT8 accuracy gate failed" in err and "budget -100" in err
    summary = json.loads((run / "summary.json").read_text())
    accuracy = summary["export"]["onnx-int8"]["accuracy"]
    assert accuracy["passed"] is False and summary["export"]["passed"] is False
    assert summary["export"]["onnx"]["parity"]["passed"] is True  # fp32 was fine; only the budget failed
    assert summary["export"]["onnx-int8"]["quantization"]["calibration_method"] == "percentile"


def test_engine_without_tensorrt_exits_2_with_hint(run_dir: Path, monkeypatch, capsys) -> None:
    import sys

    from distillctl.export.tensorrt import require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, as on this machine
    with pytest.raises(UsageError) as info:
        require_tensorrt()
    assert "TensorRT is not installed" in info.value.message and "distillctl[tensorrt]" in info.value.hint
    code = _cli(["export", str(run_dir), "--format", "engine", "--half", "--data", DATA])
    err = capsys.readouterr().err
    assert code == 2 and "TensorRT is not installed" in err and "pip install" in err


def test_tensorrt_present_but_no_gpu_is_exit_2(monkeypatch) -> None:
    import sys
    import types

    from distillctl.export.tensorrt import require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.0.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="NVIDIA CUDA GPU"):
        require_tensorrt()


def test_bad_usage_exits_2(run_dir: Path, capsys) -> None:
    assert _cli(["export", str(run_dir), "--format", "tflite", "--data", DATA]) == 2
    assert "unknown export format" in capsys.readouterr().err
    assert _cli(["export", str(run_dir), "--format", "onnx", "--half", "--data", DATA]) == 2
    assert _cli(["export", str(run_dir), "--format", "onnx-int8", "--calib-method", "mse", "--data", DATA]) == 2
    assert _cli(["export", str(run_dir), "--format", "onnx"]) == 2  # no recipe.yaml and no --data
    assert "--data" in capsys.readouterr().err


def test_opset_readback_gate_and_legacy_exporter(run_dir: Path, exported: dict, tmp_path: Path) -> None:
    with pytest.raises(GateError, match="opset 18, expected 17"):
        verify_onnx(run_dir / exported["onnx"]["path"], 17)
    model, _ = load_student(run_dir, exportable=True)
    legacy = export_onnx(model, tmp_path / "legacy.onnx", 32, exporter="legacy")
    assert default_opset(legacy) == 17
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert check_parity(model, ort_runner(legacy), images).passed


def test_bench_torch_and_onnx(run_dir: Path, exported: dict, capsys) -> None:
    from distillctl.export.bench import bench_run

    rows = bench_run(run_dir, ["torch", "onnx", "onnx-int8"], [1, 4], repeats=3, warmup=1)
    assert [(r["format"], r["batch"]) for r in rows] == [(f, b) for f in ("torch", "onnx", "onnx-int8") for b in (1, 4)]
    for row in rows:
        assert 0 < row["p50_ms"] <= row["p90_ms"] and row["images_per_sec"] > 0
        assert row["params"] == 372688 and row["size_mb"] > 0 and row["torch_threads"] >= 1
    assert {r["artefact"] for r in rows} == {"model.safetensors", "student.onnx", "student.int8.onnx"}
    code = _cli(["bench", str(run_dir), "--formats", "torch,onnx", "--batch", "2", "--repeats", "2", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["format"] for r in payload["results"]] == ["torch", "onnx"]
    assert _cli(["bench", str(run_dir), "--formats", "torch", "--batch", "0"]) == 2


def test_imagefolder_without_val_split_holds_out_every_fifth_image(tmp_path: Path) -> None:
    from PIL import Image

    from distillctl.export.api import _labelled_splits

    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for index in range(10):
            Image.new("RGB", (12, 10), color=(index * 20, 0, 0)).save(tmp_path / "data" / label / f"{index}.png")
    splits = _labelled_splits(tmp_path, str(tmp_path / "data"), None, None)
    assert len(splits.train) == 16 and len(splits.test) == 4 and splits.crop_pct == 0.875
    assert "every 5th" in splits.describe()["holdout"]


def test_accuracy_report_on_a_capped_subset(run_dir: Path, exported: dict) -> None:
    from distillctl.data.datasets import open_dataset
    from distillctl.export.accuracy import compare_knn

    report = compare_knn(run_dir / "export" / "student.onnx", run_dir / "export" / "student.int8.onnx",
                         open_dataset(DATA, "train"), open_dataset(DATA, "test"), input_size=32, mean=[0.5] * 3,
                         std=[0.25] * 3, crop_pct=0.875, max_drop=-100.0, max_train_images=300, max_test_images=60)
    assert report.protocol["train_images"] == 300 and report.protocol["test_images"] == 60
    assert "seeded subset" in report.protocol["train"]
    assert not report.passed and report.drop == pytest.approx(report.reference_top1 - report.candidate_top1, abs=1e-3)
    with pytest.raises(GateError, match=r"budget -100 \(over by \d+\.\d\d\)"):
        report.raise_if_failed()
