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


def _fake_quantize(calls: list):
    from distillctl.export.quantize import QuantizationInfo

    def quantize(fp32_path, out_path, calib, *, method="minmax", tensorrt=False, **_):
        Path(out_path).write_bytes(method.encode())
        calls.append(method)
        return QuantizationInfo(path=str(out_path), format="QDQ", per_channel=True, symmetric=tensorrt,
                                calibration_method=method, calibration_images=len(calib), quantize_linear=1,
                                dequantize_linear=1, size_bytes=1)

    return quantize


def _fake_parity(p1_by_method: dict):
    from distillctl.export.parity import TOLERANCES, ParityResult

    def check(model, runner, images, precision="fp32", **_):
        p1 = p1_by_method[runner.method]
        return ParityResult(max_abs=0.0, max_rel=0.0, ref_abs_max=1.0, min_cosine=p1, mean_cosine=p1, p1_cosine=p1,
                            batches=[1], images=4, passed=p1 >= 0.99, tolerance=TOLERANCES["int8"],
                            failures=[] if p1 >= 0.99 else [f"p1 cosine {p1}"])

    return check


@pytest.mark.parametrize("p1, chosen, tried", [
    ({"minmax": 0.995, "percentile": 0.999, "entropy": 0.999}, "minmax", ["minmax"]),  # first pass wins
    ({"minmax": 0.90, "percentile": 0.995, "entropy": 0.999}, "percentile", ["minmax", "percentile"]),
    ({"minmax": 0.90, "percentile": 0.95, "entropy": 0.93}, "percentile", ["minmax", "percentile", "entropy"]),
])
def test_auto_calibration_keeps_the_first_passing_or_the_best(monkeypatch, tmp_path: Path, p1, chosen, tried) -> None:
    from distillctl.export import api

    calls: list = []
    monkeypatch.setattr(api, "quantize_int8", _fake_quantize(calls))

    def runner(path):
        run = lambda batch: batch  # noqa: E731
        run.method = Path(path).read_bytes().decode()
        return run

    monkeypatch.setattr(api, "ort_runner", runner)
    monkeypatch.setattr(api, "check_parity", _fake_parity(p1))
    best, record = api._choose_calibration(None, tmp_path / "m.onnx", tmp_path, np.zeros((4, 3, 8, 8)), None, "auto")
    assert best["method"] == chosen and [t["method"] for t in record] == tried == calls
    assert [t["passed"] for t in record] == [p1[m] >= 0.99 for m in tried]
    assert [p.name for p in tmp_path.iterdir()] == [f".int8-try-{chosen}.onnx"]  # the losers are deleted
    fixed, none_tried = api._choose_calibration(None, tmp_path / "m.onnx", tmp_path, np.zeros(1), None, "entropy")
    assert fixed == {"method": "entropy", "info": None, "parity": None} and none_tried == []
