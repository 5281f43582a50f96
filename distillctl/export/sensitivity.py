"""Per-layer INT8 sensitivity: which quantized layers add the most error, to leave them in float.

One pass, no re-quantization per layer: the fp32 graph and its Q/DQ INT8 version are run on the same
images with every weighted layer's (dequantized) input and output exposed. A layer's error is the
normalised squared error of its output against fp32, ``||int8 - fp32||² / ||fp32||²``; what the
layer *adds* is that minus the error already on its input, i.e. what its own weight rounding and
output rounding cost. The layers that add the most hurt most: the first conv, the last projection and depthwise convs with wide per-channel ranges are the
usual suspects (export_cache_data.md §A.3, step 4). Ranked worst first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _with_outputs(path: Path, names: list[str]):
    """The model at ``path`` with ``names`` added as graph outputs (float tensors, shape left open)."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(path))
    present = {output.name for output in proto.graph.output}
    for name in names:
        if name not in present:
            proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return proto


def _run(proto, images: np.ndarray, input_name: str, names: list[str], batch: int) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(images), batch):
        values = session.run(names, {input_name: images[start:start + batch]})
        for name, value in zip(names, values):
            collected[name].append(np.asarray(value, dtype=np.float64).reshape(len(value), -1))
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def _nmse(reference: np.ndarray, candidate: np.ndarray) -> float:
    energy = float(np.sum(reference * reference))
    return float(np.sum((candidate - reference) ** 2) / energy) if energy > 0 else 0.0


def layer_sensitivity(fp32_path: str | Path, int8_qdq_path: str | Path, images: np.ndarray, *,
                      input_name: str = "input", max_images: int = 32, batch: int = 8) -> list[dict]:
    """``[{node, op, error, added}]`` for every weighted layer of ``fp32_path``, largest ``added`` first.

    ``fp32_path`` is the graph that was quantized (after ``quant_pre_process``) and ``int8_qdq_path``
    its Q/DQ INT8 version; ``images`` a few calibration images (the first ``max_images`` are used).
    A tensor's INT8 value is its dequantized copy (``DequantizeLinear(QuantizeLinear(t))``), i.e. what
    the next layer really consumes; a layer's output is taken after a following Relu/Clip, which the
    quantizer folds into the output's quantization range.
    """
    import onnx

    fp32_path, int8_qdq_path = Path(fp32_path), Path(int8_qdq_path)
    images = np.ascontiguousarray(images[:max_images], dtype=np.float32)
    proto = onnx.load(str(fp32_path), load_external_data=False)
    initializers = {init.name for init in proto.graph.initializer}
    dequantized = _dequantized_names(onnx.load(str(int8_qdq_path), load_external_data=False))
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers = []  # (node, fp32 input, fp32 output), both with an INT8 counterpart
    for node in proto.graph.node:
        data_input = next((name for name in node.input if name and name not in initializers), None)
        if node.op_type not in WEIGHTED_OPS or not node.name or data_input is None:
            continue
        output = node.output[0]
        following = consumers.get(output, [])
        if len(following) == 1 and following[0].op_type in ("Relu", "Clip"):
            output = following[0].output[0]
        if output in dequantized and (data_input in dequantized or data_input == input_name):
            layers.append((node, data_input, output))
    if not layers:
        return []
    fp32_names = sorted({name for _, data_input, output in layers for name in (data_input, output)})
    int8_names = [dequantized.get(name, name) for name in fp32_names]
    reference = _run(_with_outputs(fp32_path, fp32_names), images, input_name, fp32_names, batch)
    observed = _run(_with_outputs(int8_qdq_path, int8_names), images, input_name, int8_names, batch)
    errors = {name: _nmse(reference[name], observed[dequantized.get(name, name)]) for name in fp32_names}
    # The graph input's own rounding is charged to the layer that reads it (its "before" is exact).
    ranking = [{"node": node.name, "op": node.op_type, "error": round(errors[output], 6),
                "added": round(errors[output] - (0.0 if data_input == input_name else errors[data_input]), 6)}
               for node, data_input, output in layers]
    return sorted(ranking, key=lambda row: row["added"], reverse=True)


def _dequantized_names(proto) -> dict[str, str]:
    """``{float tensor: its DequantizeLinear(QuantizeLinear(tensor)) output}`` in a Q/DQ graph."""
    dequantize_of = {node.input[0]: node.output[0] for node in proto.graph.node if node.op_type == "DequantizeLinear"}
    return {node.input[0]: dequantize_of[node.output[0]] for node in proto.graph.node
            if node.op_type == "QuantizeLinear" and node.output[0] in dequantize_of}
