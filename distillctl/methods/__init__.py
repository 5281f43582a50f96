"""Method catalogue. Importing this package registers every method module listed here."""

from importlib import import_module

from distillctl.methods.base import Method, MethodParams, get_method, register, registry

_METHOD_MODULES = (
    "simreg", "seed", "mocov2", "simclr",
    # Method catalogue I (issue 5)
    "smd", "disco", "bingo", "compress", "regression", "byol", "dino",
    "seed_variants", "ssl_small", "simreg_variants",
    # Method catalogue II, pooled-embedding methods (issue 13)
    "ega", "dlkd", "protocpc", "protoseed",
)

for _name in _METHOD_MODULES:
    import_module(f"distillctl.methods.{_name}")

__all__ = ["Method", "MethodParams", "get_method", "register", "registry"]
