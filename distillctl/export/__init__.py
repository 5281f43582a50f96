"""Export stage: ONNX (fp32/fp16/INT8 QDQ), TensorRT engines, parity and accuracy gates, model card, bench.

Entry point for the pipeline: :func:`distillctl.export.api.export_run`. Modules import their heavy
dependencies lazily so that the CLI starts fast.
"""

import sys as _sys
import types as _types


class _CallablePackage(_types.ModuleType):
    """``distillctl.export(run_dir, formats=…)`` is the Python API's export (:func:`distillctl.api.export`); once
    this subpackage is imported it *is* the attribute ``distillctl.export``, so the package itself is callable."""

    def __call__(self, *args, **kwargs):
        from distillctl.api import export

        return export(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
