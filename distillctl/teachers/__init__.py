"""Teachers: the frozen network a student learns from (registry, download, conversion, loading).

The package's names load lazily, so ``distillctl teacher list`` and the other registry commands that never
build a network do not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distillctl.teachers.base import Preprocess, Teacher
    from distillctl.teachers.resolve import load_teacher

__all__ = ["Preprocess", "Teacher", "load_teacher"]
_HOMES = {"Preprocess": "distillctl.teachers.base", "Teacher": "distillctl.teachers.base",
          "load_teacher": "distillctl.teachers.resolve"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
