"""distillctl: distil self-supervised vision teachers into small deployable students.

``import distillctl`` stays light (no torch): the Python API (:mod:`distillctl.api`: ``run``, ``export``,
``evaluate``, ``gate``, ``bundle``, ``verify``, ``read_summary``, ``Summary``) is loaded on first use.
"""

__version__ = "0.1.0"

_API = ("Summary", "run", "export", "evaluate", "gate", "bundle", "verify", "read_summary")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """Lazy re-export of :mod:`distillctl.api` (PEP 562), so the CLI's --help never pays for it."""
    if name in _API:
        from distillctl import api

        return getattr(api, name)
    raise AttributeError(f"module 'distillctl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
