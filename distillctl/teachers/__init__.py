"""Teachers: the frozen network a student learns from (registry, download, conversion, loading)."""

from distillctl.teachers.base import Preprocess, Teacher
from distillctl.teachers.resolve import load_teacher

__all__ = ["Preprocess", "Teacher", "load_teacher"]
