"""distillctl: distil self-supervised vision teachers into small deployable students."""

__version__ = "0.1.0"

__all__ = ["__version__"]
