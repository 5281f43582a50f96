"""INT8 calibration and forms on a tiny conv net: any number of calibration images, entropy really
applied, the CPU form (uint8 activations) vs the symmetric TensorRT form, sensitivity ranking, and the
selection in which the kNN budget decides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from distillctl.export.calibration import calibrate, entropy_range, ranges_of
from distillctl.export.onnx import export_onnx
from distillctl.export.quantize import (FORMS, Int8Quantizer, count_ops, default_cpu_form, quantize_int8,
                                        tensorrt_incompatibilities)

SIZE = 12


class TinyNet(torch.nn.Module):
    """Stem conv, depthwise conv, pointwise conv, global pool: the MobileNet pattern in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = torch.nn.Conv2d(8, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(self.stem(x), 0, 6)
        x = torch.clamp(self.depthwise(x), 0, 6)
        return self.pointwise(x).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[TinyNet, Path]:
    torch.manual_seed(0)
    model = TinyNet().eval()
    path = export_onnx(model, tmp_path_factory.mktemp("int8") / "tiny.onnx", SIZE)
    return model, path


def _images(count: int, seed: int = 0, outliers: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)
    if outliers:  # a few extreme pixels: MinMax must stretch its range to them, entropy should clip
        images.reshape(-1)[rng.choice(images.size, 4, replace=False)] = 60.0
    return images


def _prepared(path: Path, tmp_path: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = tmp_path / "prepared.onnx"
    quant_pre_process(str(path), str(prepared))
    return prepared


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_13_images_at_batch_4_calibrate_for_every_method(tiny, tmp_path: Path, method: str) -> None:
    """onnxruntime's histogram calibrators crashed ('inhomogeneous shape') when the last batch was smaller."""
    prepared = _prepared(tiny[1], tmp_path)
    images = _images(13)
    ragged = ranges_of(calibrate(prepared, images, method, tmp_path, batch_size=4))
    assert "input" in ragged and len(ragged) >= 4
    assert all(np.isfinite(low) and np.isfinite(high) and low <= high for low, high in ragged.values())
    if method == "minmax":  # min/max merge exactly: batch size must not matter
        whole = ranges_of(calibrate(prepared, images, method, tmp_path, batch_size=13))
        assert ragged == whole
        assert ragged["input"] == (float(images.min()), float(images.max()))


def test_entropy_is_applied_and_differs_from_minmax(tiny, tmp_path: Path) -> None:
    """With onnxruntime's defaults (128 bins, 128 quantized bins) entropy returned the MinMax ranges exactly."""
    prepared = _prepared(tiny[1], tmp_path)
    images = _images(32, outliers=True)
    minmax = ranges_of(calibrate(prepared, images, "minmax", tmp_path))
    entropy = ranges_of(calibrate(prepared, images, "entropy", tmp_path))
    assert minmax["input"][1] == pytest.approx(60.0)
    assert entropy["input"][1] < 20.0  # the 4 outliers among 13,824 values are clipped away
    assert entropy["input"][1] > 2.5  # ... but not the bulk of a unit Gaussian
    # And the quantized graphs really use different scales for the input.
    scales = {}
    for method in ("minmax", "entropy"):
        info = quantize_int8(tiny[1], tmp_path / f"{method}.onnx", images, method=method, form="qdq-u8s8")
        scales[method] = _input_scale(Path(info.path))
    assert scales["entropy"] < scales["minmax"] / 3


def _input_scale(path: Path) -> float:
    proto = onnx.load(str(path))
    constants = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    return float(constants[node.input[1]])


def test_entropy_range_of_a_gaussian_with_outliers() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(200_000), [40.0, -45.0]]).astype(np.float32)
    threshold = float(np.abs(values).max())
    counts, edges = np.histogram(values, 2048, range=(-threshold, threshold))
    low, high = entropy_range((counts, edges, values.min(), values.max(), threshold))
    assert -10.0 < low < -3.0 and 3.0 < high < 10.0


def test_cpu_form_uses_uint8_activations_and_int8_per_channel_weights(tiny, tmp_path: Path) -> None:
    info = quantize_int8(tiny[1], tmp_path / "cpu.onnx", _images(8), form="qdq-u8s8")
    assert (info.form, info.format, info.activation_type, info.weight_type, info.symmetric) == \
        ("qdq-u8s8", "QDQ", "QUInt8", "QInt8", False)
    proto = onnx.load(info.path)
    constants = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    activation_zero_points = [constants[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_zero_points and all(z.dtype == np.uint8 for z in activation_zero_points)
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and constants.get(n.input[0]) is not None
                 and constants[n.input[0]].ndim == 4]
    assert len(weight_dq) == 3  # the three convs' weights
    assert all(constants[n.input[0]].dtype == np.int8 for n in weight_dq)
    assert all(constants[n.input[1]].size == constants[n.input[0]].shape[0] for n in weight_dq)  # per channel
    assert tensorrt_incompatibilities(info.path)  # uint8 zero-points: not for TensorRT


def test_tensorrt_form_stays_symmetric_with_zero_point_0(tiny, tmp_path: Path) -> None:
    info = quantize_int8(tiny[1], tmp_path / "trt.onnx", _images(13), method="entropy", form="tensorrt",
                         batch_size=4)
    assert (info.form, info.symmetric, info.activation_type) == ("tensorrt", True, "QInt8")
    assert tensorrt_incompatibilities(info.path) == []
    proto = onnx.load(info.path)
    zero_points = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)


def test_qoperator_form_and_one_calibration_for_every_form(tiny, tmp_path: Path) -> None:
    from distillctl.export.parity import check_parity, ort_runner

    model, path = tiny
    images = _images(16)
    with Int8Quantizer(path, images, workdir=tmp_path) as quantizer:
        infos = {form: quantizer.write(tmp_path / f"{form}.onnx", method="minmax", form=form) for form in FORMS}
        assert list(quantizer._ranges) == ["minmax"]  # calibrated once, shared by the four forms
    assert count_ops(infos["qoperator-u8s8"].path).get("QLinearConv") == 3
    assert infos["qoperator-u8s8"].quantized_ops >= 3
    for form, info in infos.items():
        parity = check_parity(model, ort_runner(info.path), images, precision="int8")
        assert parity.mean_cosine > 0.98, form
    assert not list(tmp_path.glob(".quant-*"))  # the work directory is gone


def test_default_cpu_form_by_machine() -> None:
    assert default_cpu_form("x86_64") == "qdq-u8s8" and default_cpu_form("AMD64") == "qdq-u8s8"
    assert default_cpu_form("aarch64") == "qdq-s8s8" and default_cpu_form("arm64") == "qdq-s8s8"


def test_sensitivity_ranks_the_layer_fed_by_an_outlier_range_first(tiny, tmp_path: Path) -> None:
    from distillctl.export.sensitivity import layer_sensitivity

    path = tiny[1]
    # Calibrated on images with extreme pixels (MinMax): the stem's input step becomes ~60/255, so the
    # stem (fed by that input) adds by far the most error on ordinary images.
    with Int8Quantizer(path, _images(16, outliers=True), workdir=tmp_path) as quantizer:
        info = quantizer.write(tmp_path / "q.onnx", method="minmax", form="qdq-u8s8")
        ranking = layer_sensitivity(quantizer.prepared, info.path, _images(8, seed=1))
        names = quantizer.quantizable_nodes()
    assert sorted(row["node"] for row in ranking) == sorted(names) and len(names) == 3
    assert ranking[0]["node"] == names[0]  # the stem conv
    assert ranking[0]["added"] > 3 * ranking[1]["added"] > 0
    assert all(row["error"] >= 0 for row in ranking)


def test_entropy_keeps_the_embedding_and_relu6_ranges(tiny, tmp_path: Path) -> None:
    """KL clipping of the pooled embedding / ReLU6 outputs wrecked a real student (mean cosine 0.64): kept at min/max."""
    from distillctl.export.calibration import full_range_tensors

    prepared = _prepared(tiny[1], tmp_path)
    protected = full_range_tensors(prepared)
    proto = onnx.load(str(prepared))
    clips = {node.output[0] for node in proto.graph.node if node.op_type == "Clip"}
    assert "embedding" in protected and clips and clips <= protected
    images = _images(32, outliers=True)
    entropy = ranges_of(calibrate(prepared, images, "entropy", tmp_path))
    minmax = ranges_of(calibrate(prepared, images, "minmax", tmp_path))
    for name in protected & set(entropy):
        assert entropy[name] == pytest.approx(minmax[name], rel=1e-6), name
    assert entropy["input"][1] < minmax["input"][1] / 3  # unprotected tensors are still clipped


class NarrowGateNet(torch.nn.Module):
    """A squeeze-excitation gate whose sigmoid stays at 0.5 ± ~1e-6 for every image (tiny gate weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.gate = torch.nn.Conv2d(8, 8, 1)
        with torch.no_grad():
            self.gate.weight.mul_(1e-5)
            self.gate.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return (x * torch.sigmoid(self.gate(x.mean(dim=(2, 3), keepdim=True)))).mean(dim=(2, 3))


def test_percentile_calibrates_a_gate_whose_values_barely_vary(tmp_path: Path) -> None:
    """onnxruntime's percentile histogram raised 'Too many bins for data range' on such a tensor (EfficientNet-B0)."""
    from onnxruntime.quantization.calibrate import create_calibrator

    from distillctl.export.calibration import _empty_absolute_histogram, _OneBatch, ort_method
    from distillctl.export.parity import check_parity, ort_runner

    torch.manual_seed(0)
    model = NarrowGateNet().eval()
    path = export_onnx(model, tmp_path / "gate.onnx", SIZE)
    prepared = _prepared(path, tmp_path)
    images = _images(13)
    gate = next(n.output[0] for n in onnx.load(str(prepared)).graph.node if n.op_type == "Sigmoid")
    # the unpatched collector fails on this graph ...
    plain = create_calibrator(prepared, None, augmented_model_path=str(tmp_path / "aug.onnx"),
                              calibrate_method=ort_method("percentile"), extra_options={"num_bins": 2048})
    with pytest.raises(ValueError, match="Too many bins"):
        plain.collect_data(_OneBatch({"input": images[:4]}))
    # ... ours calibrates it (ragged batches too) to a range around 0.5, and the INT8 file keeps its parity
    ranges = ranges_of(calibrate(prepared, images, "percentile", tmp_path, batch_size=4))
    low, high = ranges[gate]
    assert np.isfinite(low) and 0.4999 < low <= 0.5 <= high < 0.5001  # the gate's own values, not inverted
    info = quantize_int8(path, tmp_path / "gate.int8.onnx", images, method="percentile", form="qdq-u8s8")
    assert check_parity(model, ort_runner(info.path), images, precision="int8").mean_cosine > 0.99
    # tensors with room for 2048 bins (and constant ones) are left to onnxruntime's own histogram
    assert _empty_absolute_histogram(np.linspace(-1.0, 3.0, 100, dtype=np.float32), 2048) is None
    assert _empty_absolute_histogram(np.full(10, 0.5, dtype=np.float32), 2048) is None
    counts, edges, lowest, highest = _empty_absolute_histogram(np.float32(0.5) + np.linspace(0, 2e-6, 50,
                                                                                               dtype=np.float32), 2048)
    assert counts.sum() == 0 and len(edges) == 2049 and edges[0] == 0 and np.all(np.diff(edges) > 0)
    assert edges[-2] == pytest.approx(0.500002, abs=1e-7)  # the last bin starts at max|x|
    assert lowest == np.float32(0.5) and highest == pytest.approx(0.500002)


def _qdq_model(path: Path, zero_point_type: int) -> Path:
    """Input → QuantizeLinear → DequantizeLinear → Relu, with the activation zero point of ``zero_point_type``."""
    from onnx import TensorProto, helper

    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("zero", zero_point_type, [], [0])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["input", "scale", "zero"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"]),
         helper.make_node("Relu", ["dq"], ["embedding"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 4])], [scale, zero])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_int8_activations_on_x86_without_vnni_are_evaluated_unfused(tmp_path, monkeypatch):
    """The symmetric (TensorRT) form has int8 activations; onnxruntime's fused kernels on x86 without VNNI saturate
    on them, so the gates run such a model unfused (its own Q/DQ math). uint8 activations (reduce_range handles
    them), fp32 models and CPUs with VNNI or another architecture keep the fused session."""
    import distillctl.export.quantize as quantize
    from distillctl.export.parity import ort_runner

    s8 = _qdq_model(tmp_path / "s8.onnx", onnx.TensorProto.INT8)
    u8 = _qdq_model(tmp_path / "u8.onnx", onnx.TensorProto.UINT8)
    monkeypatch.setattr(quantize, "default_cpu_form", lambda machine=None: "qdq-u8s8")
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: False)
    assert quantize.saturating_int8_kernels(s8) and not quantize.saturating_int8_kernels(u8)
    assert not quantize.saturating_int8_kernels(tmp_path / "missing.onnx")
    x = np.array([[0.05, -0.3, 1.04, 20.0]], dtype=np.float32)
    assert np.allclose(ort_runner(s8)(x), [[0.0, 0.0, 1.0, 12.7]], atol=1e-6)  # int8 rounding (half to even), clipping
    import onnxruntime as ort

    from distillctl.eval.features import OnnxEncoder

    def level(path):
        return OnnxEncoder(path, providers=["CPUExecutionProvider"]).session.get_session_options().graph_optimization_level

    assert level(s8) == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert level(u8) != ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: True)
    assert not quantize.saturating_int8_kernels(s8)
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: False)
    monkeypatch.setattr(quantize, "default_cpu_form", lambda machine=None: "qdq-s8s8")  # e.g. aarch64
    assert not quantize.saturating_int8_kernels(s8)


def test_ort_session_decides_unfused_int8_unless_told(tmp_path, monkeypatch):
    """One place decides whether a session runs Q/DQ unfused: ort_session with exact_int8=None (what the gates and
    the evaluators use). A speed measurement's exact_int8=False keeps the fused kernels a deployment runs."""
    import onnxruntime as ort

    import distillctl.export.quantize as quantize
    from distillctl.export.onnx import ort_session

    s8 = _qdq_model(tmp_path / "s8.onnx", onnx.TensorProto.INT8)
    monkeypatch.setattr(quantize, "default_cpu_form", lambda machine=None: "qdq-u8s8")
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: False)

    def level(**kwargs):
        return ort_session(s8, **kwargs).get_session_options().graph_optimization_level

    unfused = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert level() == unfused
    assert level(exact_int8=False) != unfused
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: True)
    assert level() != unfused and level(exact_int8=True) == unfused
