"""Export stage: ONNX (fp32/fp16/INT8 QDQ), TensorRT engines, parity and accuracy gates, model card, bench.

Entry point for the pipeline: :func:`distillctl.export.api.export_run`. Modules import their heavy
dependencies lazily so that the CLI starts fast.
"""
