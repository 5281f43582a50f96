"""A static index of the method registry for ``distillctl methods list``, so listing does not import torch.

``method_catalogue.json`` (generated, shipped in the package) holds one row per registered method — name, kind,
teachers, teacher mode, title — and the names of the method source files it was generated from. Listing uses it
while those file names are unchanged; a new method file (or a missing index) falls back to importing the live
registry, which is always right, only slower. A test (tests/ci/test_ci_startup.py) fails when the index differs
from the live registry, with the command that regenerates it::

    python -m distillctl.method_catalogue

It lives outside ``distillctl/methods/`` because importing anything in that package runs its ``__init__``, which
registers (imports) every method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INDEX = Path(__file__).with_name("method_catalogue.json")
METHODS_DIR = Path(__file__).with_name("methods")


def source_files() -> list[str]:
    """The method package's module files: a new one may register methods the index does not know."""
    return sorted(path.name for path in METHODS_DIR.glob("*.py"))


def live_rows() -> list[dict[str, Any]]:
    """Rows from the live registry (imports every method module, hence torch)."""
    from distillctl.methods.base import TeacherDims, registry

    rows = []
    for name, cls in sorted(registry().items()):
        try:
            dims = TeacherDims(64, 32)
            probe = cls(cls.Params(), 64, [dims, dims] if cls.multi_teacher else dims)
            mode = probe.requirements(32).teacher_mode
        except Exception as exc:  # noqa: BLE001 - listing must not fail on one method
            mode = f"? ({type(exc).__name__})"
        rows.append({"name": name, "kind": cls.kind, "teacher_mode": mode, "title": cls.title,
                     "teachers": teacher_count(cls)})
    return rows


def teacher_count(cls) -> str:  # noqa: ANN001
    return "0" if cls.kind == "ssl" else ("2+" if cls.multi_teacher else "1")


def rows() -> list[dict[str, Any]]:
    """The listing: the shipped index when it matches the method files, else the live registry."""
    try:
        index = json.loads(INDEX.read_text())
    except (OSError, ValueError):
        return live_rows()
    if index.get("source_files") != source_files():
        return live_rows()
    return index["methods"]


def write_index() -> Path:
    INDEX.write_text(json.dumps({"source_files": source_files(), "methods": live_rows()}, indent=1, sort_keys=True)
                     + "\n")
    return INDEX


if __name__ == "__main__":
    print(f"wrote {write_index()}")
