"""Unit checks of the export building blocks on tiny inputs: parity maths, Q/DQ checker, card, TRT rules."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from distillctl.errors import GateError
from distillctl.export.card import card_to_metadata, metadata_to_card
from distillctl.export.parity import TOLERANCES, evaluate_parity, parity_batches
from distillctl.export.quantize import tensorrt_incompatibilities


def test_parity_metrics_match_a_loop_computation() -> None:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((6, 5)) * 3
    candidate = (reference + rng.standard_normal((6, 5)) * 0.05).astype(np.float32)
    result = evaluate_parity(reference, {1: candidate, 3: candidate}, TOLERANCES["int8"])
    cosines = []
    for row_ref, row_cand in zip(reference.tolist(), candidate.tolist()):
        dot = sum(a * b for a, b in zip(row_ref, row_cand))
        norm = math.sqrt(sum(a * a for a in row_ref)) * math.sqrt(sum(b * b for b in row_cand))
        cosines.append(dot / norm)
    max_abs = max(abs(a - b) for r, c in zip(reference.tolist(), candidate.tolist()) for a, b in zip(r, c))
    ref_max = max(abs(a) for row in reference.tolist() for a in row)
    assert result.max_abs == pytest.approx(max_abs, rel=1e-6)
    assert result.max_rel == pytest.approx(max_abs / ref_max, rel=1e-6)
    assert result.min_cosine == pytest.approx(min(cosines), abs=1e-9)
    assert result.mean_cosine == pytest.approx(sum(cosines) / len(cosines), abs=1e-9)
    assert result.batches == [1, 3] and result.images == 6


def test_fp32_gate_bound_is_relative_to_output_scale() -> None:
    reference = np.zeros((2, 4))
    reference[0, 0] = 5.0  # |ref|inf = 5 -> bound 1e-4 * 5 = 5e-4
    reference[1, 1] = 1.0
    inside = reference + 4e-4
    outside = reference.copy()
    outside[1, 2] += 6e-4
    assert evaluate_parity(reference, {1: inside}, TOLERANCES["fp32"]).passed
    failed = evaluate_parity(reference, {1: outside}, TOLERANCES["fp32"])
    assert not failed.passed
    with pytest.raises(GateError, match=r"max\|Δ\| 0.0006 > 0.0005 .*1.2× over"):
        failed.raise_if_failed("x.onnx")


def test_nan_output_fails_every_gate() -> None:
    reference = np.ones((2, 3))
    candidate = reference.copy()
    candidate[0, 0] = np.nan
    result = evaluate_parity(reference, {2: candidate}, TOLERANCES["fp32"])
    assert not result.passed and math.isinf(result.max_abs)


def test_int8_gate_uses_mean_and_first_percentile_cosine() -> None:
    reference = np.eye(200, 8)[:, :8] + 0.5
    candidate = reference.copy()
    candidate[:3] = -candidate[:3]  # three flipped embeddings: mean still high, p1 cosine negative
    result = evaluate_parity(reference, {1: candidate}, TOLERANCES["int8"])
    assert result.mean_cosine > 0.96 and result.p1_cosine < 0
    assert not result.passed and any("p1 cosine" in f for f in result.failures)


def test_parity_batches() -> None:
    assert parity_batches(64) == [1, 3, 32]
    assert parity_batches(2) == [1, 2]


def _qdq_model(zero_point: np.ndarray | None) -> onnx.ModelProto:
    inputs = ["x", "scale"] + (["zp"] if zero_point is not None else [])
    nodes = [helper.make_node("QuantizeLinear", inputs, ["q"], name="q0"),
             helper.make_node("DequantizeLinear", ["q"] + inputs[1:], ["y"], name="dq0")]
    inits = [numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale")]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(zero_point, "zp"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    ("zero_point", "expected"),
    [(np.array(0, dtype=np.int8), None), (np.array(3, dtype=np.int8), "non-zero"),
     (np.array(0, dtype=np.uint8), "dtype uint8"), (None, "no zero-point")],
)
def test_tensorrt_checker_on_handmade_graphs(tmp_path: Path, zero_point, expected) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_qdq_model(zero_point), str(path))
    problems = tensorrt_incompatibilities(path)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 2 and all(expected in p for p in problems)


def test_card_metadata_round_trip() -> None:
    card = {"schema_version": 1, "method": "simreg", "teacher": {"name": "t", "sha256": "ab"},
            "input": {"size": [3, 32, 32], "mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}, "artifacts": {"x": {}}}
    props = card_to_metadata(card)
    assert all(isinstance(v, str) for v in props.values())
    assert props["distillctl.method"] == "simreg" and json.loads(props["distillctl.teacher"])["sha256"] == "ab"
    assert json.loads(props["distillctl.input.size"]) == [3, 32, 32]
    assert "distillctl.artifacts" not in props
    back = metadata_to_card(props)
    assert back == {k: v for k, v in card.items() if k != "artifacts"}


# --------------------------------------------------------------------------------------------------
# TensorRT 10/11 precision rules, against a recording stand-in for the tensorrt module (no GPU here).


class _FakeTensorRT(types.ModuleType):
    """Records the builder calls build_engine makes; the plan bytes are a fixed payload."""

    def __init__(self, version: str) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls: list[tuple] = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level): pass

        class Config:
            def __init__(self):
                self.flags: set[str] = {"TF32"}
                self.cache = b""

            def set_memory_pool_limit(self, pool, size): fake.calls.append(("workspace", pool, size))
            def add_optimization_profile(self, profile): fake.calls.append(("profile", profile.shapes))
            def set_flag(self, flag): self.flags.add(flag)
            def clear_flag(self, flag): self.flags.discard(flag)
            def create_timing_cache(self, data): fake.calls.append(("cache-in", bytes(data))); return data
            def set_timing_cache(self, cache, ignore_mismatch): self.cache = bytes(cache) + b"+t"
            def get_timing_cache(self): return types.SimpleNamespace(serialize=lambda: self.cache)

        class Profile:
            def set_shape(self, name, low, opt, high): self.shapes = (name, low, opt, high)

        class Builder:
            def __init__(self, logger): pass
            def create_network(self, flags): fake.calls.append(("network", flags)); return object()
            def create_builder_config(self): return Config()
            def create_optimization_profile(self): return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("flags", sorted(config.flags)))
                return b"PLAN"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger): pass
            def parse_from_file(self, path): fake.calls.append(("parse", Path(path).name)); return True

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", TF32="TF32")

    def call(self, kind):
        return [c[1:] for c in self.calls if c[0] == kind]


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    for name in ("student.onnx", "student.fp16.onnx", "student.int8.trt.onnx"):
        (tmp_path / name).write_bytes(b"onnx")
    return tmp_path


@pytest.mark.parametrize(
    ("version", "precision", "parsed", "flags", "builder_flags"),
    [("11.4.0", "fp16", "student.fp16.onnx", 0, ["TF32"]),      # 11.x: strongly typed, fp16 from the graph
     ("11.4.0", "int8", "student.int8.trt.onnx", 0, ["TF32"]),
     ("10.13.2", "fp16", "student.onnx", 0, ["FP16", "TF32"]),  # 10.x: weak typing + FP16 flag
     ("10.13.2", "int8", "student.int8.trt.onnx", 1 << 5, ["TF32"]),  # 10.x: STRONGLY_TYPED opt-in for QDQ
     ("10.13.2", "fp32", "student.onnx", 0, [])],               # fp32 clears TF32
)
def test_engine_build_follows_tensorrt_rules(monkeypatch, fake_gpu: Path, version, precision, parsed, flags,
                                             builder_flags) -> None:
    from distillctl.export.tensorrt import build_engine

    fake = _FakeTensorRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    info = build_engine(fake_gpu, input_size=32, precision=precision, mean=[0.5] * 3, std=[0.25] * 3)
    assert fake.call("parse") == [(parsed,)] and fake.call("network") == [(flags,)]
    assert fake.call("flags") == [(builder_flags,)]
    assert fake.call("profile") == [(("input", (1, 3, 32, 32), (32, 3, 32, 32), (256, 3, 32, 32)),)]
    assert fake.call("workspace") == [("workspace", 4 << 30)]
    major_minor = ".".join(version.split(".")[:2])
    assert Path(info.path).name == f"student.{precision}.h100-80gb-hbm3-sm90.trt{major_minor}.engine"
    assert Path(info.path).read_bytes() == b"PLAN"
    sidecar = json.loads(Path(info.path + ".json").read_text())
    assert sidecar["input_size"] == 32 and sidecar["std"] == [0.25] * 3 and sidecar["precision"] == precision
    # The timing cache persists and is fed back into the next build.
    cache = fake_gpu / info.timing_cache
    assert cache.read_bytes() == b"+t"
    build_engine(fake_gpu, input_size=32, precision=precision)
    assert fake.call("cache-in")[-1] == (b"+t",)


class _FakeQuantizer:
    """Writes '<method>|<excluded>' files instead of models; records what was asked for."""

    images = np.zeros((4, 3, 8, 8), dtype=np.float32)
    prepared = None

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def write(self, path, *, method, form, exclude=()):
        from distillctl.export.quantize import FORMS, QuantizationInfo

        Path(path).write_text(f"{method}|{','.join(exclude)}")
        self.calls.append((method, tuple(exclude)))
        spec = FORMS[form]
        return QuantizationInfo(path=str(path), form=form, format=spec.format, activation_type=spec.activation_type,
                                weight_type=spec.weight_type, per_channel=True, symmetric=spec.symmetric,
                                reduce_range=False, runtime=spec.runtime, calibration_method=method,
                                calibration_images=4, quantize_linear=1, dequantize_linear=1, quantized_ops=0,
                                size_bytes=1, excluded_nodes=list(exclude))


def _selection(monkeypatch, tmp_path: Path, cosine: dict, drop: dict, ranking: list[str] | None = None):
    """Run select_int8 with per-key ('method' or 'method|a,b') mean cosines and kNN drops (budget 1 point)."""
    from types import SimpleNamespace

    from distillctl.export import int8
    from distillctl.export.parity import TOLERANCES, evaluate_parity

    def check(model, runner, images, precision="int8", **_):
        c = cosine[runner.key]  # a 2-D rotation by angle acos(c): every row has cosine c
        reference = np.tile([[1.0, 0.0]], (100, 1))
        return evaluate_parity(reference, {1: np.tile([[c, np.sqrt(1 - c * c)]], (100, 1))}, TOLERANCES[precision])

    def runner(path):
        run = lambda batch: batch  # noqa: E731
        run.key = Path(path).read_text().rstrip("|")
        return run

    evaluated: list[str] = []

    def accuracy_of(path):
        key = Path(path).read_text().rstrip("|")
        evaluated.append(key)
        return SimpleNamespace(drop=drop[key], passed=drop[key] <= 1.0)

    monkeypatch.setattr(int8, "check_parity", check)
    monkeypatch.setattr(int8, "ort_runner", runner)
    monkeypatch.setattr(int8, "_sensitivity", lambda *a: [{"node": n, "added": 1.0} for n in (ranking or [])])
    quantizer = _FakeQuantizer()
    chosen, tried = int8.select_int8(quantizer, None, None, tmp_path, methods=("minmax", "percentile", "entropy"),
                                     form="qdq-u8s8", accuracy_of=accuracy_of)
    return chosen, tried, evaluated, quantizer


def test_int8_selection_the_accuracy_budget_decides(monkeypatch, tmp_path: Path) -> None:
    # percentile has the best cosine but misses the kNN budget; entropy (second by cosine) meets it.
    chosen, tried, evaluated, quantizer = _selection(
        monkeypatch, tmp_path, cosine={"minmax": 0.97, "percentile": 0.995, "entropy": 0.99},
        drop={"minmax": 0.0, "percentile": 1.5, "entropy": 0.4})
    assert (chosen.method, chosen.exclude) == ("entropy", [])
    assert evaluated == ["percentile", "entropy"]  # minmax fails the cosine floor (mean 0.97 < 0.98): not evaluated
    assert [(t["method"], t["cosine_floor_passed"]) for t in tried] == [("minmax", False), ("percentile", True),
                                                                        ("entropy", True)]
    assert tried[1]["knn_drop"] == 1.5 and tried[1]["accuracy_passed"] is False
    assert [p.name for p in tmp_path.iterdir()] == [".int8-try-entropy.onnx"]  # the losers are deleted


def test_int8_selection_leaves_the_most_sensitive_layers_in_float(monkeypatch, tmp_path: Path) -> None:
    layers = [f"conv{i}" for i in range(12)]
    chosen, tried, evaluated, quantizer = _selection(
        monkeypatch, tmp_path, cosine={"minmax": 0.99, "percentile": 0.985, "entropy": 0.97, "minmax|conv0": 0.992,
                                       "minmax|conv0,conv1": 0.995},
        drop={"minmax": 2.0, "percentile": 3.0, "minmax|conv0": 1.2, "minmax|conv0,conv1": 0.3}, ranking=layers)
    assert (chosen.method, chosen.exclude) == ("minmax", ["conv0", "conv1"])
    assert quantizer.calls[-2:] == [("minmax", ("conv0",)), ("minmax", ("conv0", "conv1"))]
    assert tried[-1]["excluded_nodes"] == ["conv0", "conv1"] and tried[-1]["accuracy_passed"] is True
    assert chosen.sensitivity[0]["node"] == "conv0"


def test_int8_selection_keeps_the_smallest_drop_when_nothing_passes(monkeypatch, tmp_path: Path) -> None:
    layers = ["a", "b", "c", "d"]  # a quarter of 4 layers: only one exclusion step (1 layer)
    chosen, tried, evaluated, quantizer = _selection(
        monkeypatch, tmp_path, cosine={"minmax": 0.99, "percentile": 0.985, "entropy": 0.99, "minmax|a": 0.99},
        drop={"minmax": 2.0, "percentile": 1.8, "entropy": 2.5, "minmax|a": 1.9}, ranking=layers)
    assert not chosen.passed and (chosen.method, chosen.exclude) == ("percentile", [])
    assert len(tried) == 4 and quantizer.calls[-1] == ("minmax", ("a",))
    assert [p.name for p in tmp_path.iterdir()] == [".int8-try-percentile.onnx"]


@pytest.mark.parametrize("measured_p1", [0.9665, 0.9203])
def test_int8_floor_passes_well_calibrated_students_and_fails_broken_quantization(measured_p1: float) -> None:
    """p1 cosine 0.9665 (issue-15 compress-1q) and 0.9203 (ega at 120,000 images, minmax, mean 0.9976), both with
    INT8 kNN better than fp32, must pass the floor; a collapsed embedding must not."""
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((200, 64))
    noise = rng.standard_normal((200, 64))

    def at_cosine(target: float) -> np.ndarray:  # rows at a chosen angle to the reference
        ortho = noise - (noise * reference).sum(1, keepdims=True) / (reference ** 2).sum(1, keepdims=True) * reference
        ortho *= np.linalg.norm(reference, axis=1, keepdims=True) / np.linalg.norm(ortho, axis=1, keepdims=True)
        return target * reference + np.sqrt(1 - target ** 2) * ortho

    cosines = np.full(200, 0.99)
    cosines[:3] = measured_p1  # the measured p1 (3 of 200 rows below the 1st percentile)
    candidate = np.stack([at_cosine(c)[i] for i, c in enumerate(cosines)])
    result = evaluate_parity(reference, {1: candidate}, TOLERANCES["int8"])
    assert result.p1_cosine == pytest.approx(measured_p1, abs=1e-3) and result.passed
    broken = evaluate_parity(reference, {1: at_cosine(0.8)}, TOLERANCES["int8"])
    assert not broken.passed and len(broken.failures) == 2


def test_export_config_is_the_recipe_section_with_one_line_errors() -> None:
    """CLI flags and API keywords become the recipe's ``export`` section (the exporter takes sections, not lists)."""
    from distillctl.config import ExportConfig
    from distillctl.errors import UsageError
    from distillctl.export.api import export_config

    section = export_config("onnx-int8,onnx", calib_size=32, max_drop=2.0)
    assert isinstance(section, ExportConfig)
    assert section.formats == ["onnx", "onnx-int8"] and section.calib_size == 32 and section.max_drop == 2.0
    assert section.calib_method == ExportConfig().calib_method  # defaults are the recipe's
    for bad, words in (({"calib_method": "kl"}, "calibration method"), ({"int8_form": "u4"}, "INT8 form"),
                       ({"calib_sise": 3}, "unknown export option"), ({"max_drop": -1.0}, "max_drop")):
        with pytest.raises(UsageError) as caught:
            export_config(["onnx"], **bad)
        assert words in str(caught.value) and caught.value.exit_code == 2


def test_bench_times_formats_interleaved_with_cpu_time() -> None:
    from distillctl.export.bench import time_interleaved

    calls: list[str] = []

    def busy(name: str, work: int):
        def call() -> None:
            calls.append(name)
            sum(i * i for i in range(work))  # CPU-bound: its CPU time is most of its wall time

        return call

    synced: list[str] = []
    timings = time_interleaved({"a": busy("a", 20000), "b": busy("b", 60000)}, repeats=4, warmup=2,
                               syncs={"a": None, "b": lambda: synced.append("b")})
    # warm-up per callable, then rounds alternating the order (a b | b a | ...), each turn an untimed
    # re-warm call and a timed call of the same callable
    assert calls == ["a", "a", "b", "b"] + ["a", "a", "b", "b", "b", "b", "a", "a"] * 2
    assert synced == ["b"] * 9  # after the warm-up, after each re-warm and each timed call
    for name in ("a", "b"):
        wall, cpu = timings[name]
        assert len(wall) == len(cpu) == 4 and all(w > 0 and c >= 0 for w, c in zip(wall, cpu))
    assert np.median(timings["b"][1]) > np.median(timings["a"][1])  # 3x the work, measured in CPU time


def test_bench_speedups_from_wall_and_cpu_time() -> None:
    from distillctl.export.bench import _add_speedups, summarise

    rows = [{"format": "onnx", "batch": 2, "threads": 1, **summarise([0.004] * 3, 2, [0.002] * 3)},
            {"format": "onnx-int8", "batch": 2, "threads": 1, **summarise([0.001] * 3, 2, [0.0008] * 3)}]
    _add_speedups(rows)
    assert rows[0]["cpu_p50_ms"] == 2.0 and rows[1]["images_per_sec"] == 2000.0
    assert rows[1]["speedup_vs_onnx_fp32"] == 4.0 and rows[1]["speedup_vs_onnx_fp32_cpu"] == 2.5
    assert rows[0]["speedup_vs_onnx_fp32_cpu"] == 1.0


def test_bench_groups_formats_by_runtime_with_the_ort_fp32_baseline() -> None:
    from distillctl.export.bench import _add_speedups, runtime_groups

    formats = ["torch", "onnx", "onnx-int8", "openvino", "openvino-int8"]
    assert runtime_groups(formats) == [["onnx", "onnx-int8"], ["torch"], ["openvino", "openvino-int8"]]
    assert runtime_groups(["openvino-int8", "torch"]) == [["torch"], ["openvino-int8"]]
    # a row timed beside its own ORT fp32 calls is compared with those, not with the ORT group's
    rows = [{"format": "onnx", "batch": 1, "threads": 1, "p50_ms": 1.0, "cpu_p50_ms": 1.0, "baseline_p50_ms": 1.0,
             "baseline_cpu_p50_ms": 1.0},
            {"format": "openvino-int8", "batch": 1, "threads": 1, "p50_ms": 0.5, "cpu_p50_ms": 0.5,
             "baseline_p50_ms": 2.0, "baseline_cpu_p50_ms": 1.5}]
    _add_speedups(rows)
    assert rows[1]["speedup_vs_onnx_fp32"] == 4.0 and rows[1]["speedup_vs_onnx_fp32_cpu"] == 3.0
    assert rows[0]["speedup_vs_onnx_fp32"] == 1.0
