"""Method catalogue. Importing this package registers every method module."""

from importlib import import_module

from distillctl.methods.base import Method, MethodParams, get_method, register, registry

_METHOD_MODULES = (
    "simreg", "seed", "mocov2", "simclr",
    # Method catalogue I (issue 5)
    "smd", "disco", "bingo", "compress", "regression", "byol", "dino",
    "seed_variants", "simreg_variants", "ssl_small",
)

for _name in _METHOD_MODULES:
    try:
        import_module(f"distillctl.methods.{_name}")
    except ModuleNotFoundError as _exc:  # a module not written yet
        if _exc.name != f"distillctl.methods.{_name}":
            raise

__all__ = ["Method", "MethodParams", "get_method", "register", "registry"]
