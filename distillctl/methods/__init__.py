"""Method catalogue: ``registry()`` (methods/base.py) imports every module listed here so that they register.

Importing the package itself stays light (no torch): pure-data modules such as ``measured`` load without the
training stack, which keeps ``distillctl methods list`` and ``--help`` fast. The names below re-export lazily.
"""

from importlib import import_module

_METHOD_MODULES = (
    "simreg", "seed", "mocov2", "simclr",
    # Method catalogue I (issue 5)
    "smd", "disco", "bingo", "compress", "regression", "byol", "dino",
    "seed_variants", "ssl_small", "simreg_variants",
    # Method catalogue II, pooled-embedding methods (issue 13)
    "ega", "dlkd", "protocpc", "protoseed",
    # ... and those trained on an offline teacher artefact (k-means labels / kNN relations beside the cache)
    "noroozi_kt", "rekd",
    # Method catalogue III, dense / ViT methods (issue 14)
    "dense_reg", "attndistill", "pcd", "mae_lite",
    # Method catalogue II, co-trained teachers (issue 13)
    "dogo", "simdis", "oss",
)

__all__ = ["Method", "MethodParams", "get_method", "register", "registry", "load_all"]


def load_all() -> None:
    """Import every method module (each registers its classes with ``@register``)."""
    for name in _METHOD_MODULES:
        import_module(f"distillctl.methods.{name}")


def __getattr__(name: str):
    if name in ("Method", "MethodParams", "get_method", "register", "registry"):
        from distillctl.methods import base

        load_all()
        return getattr(base, name)
    raise AttributeError(f"module 'distillctl.methods' has no attribute {name!r}")
