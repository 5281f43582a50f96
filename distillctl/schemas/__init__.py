"""JSON Schemas of distillctl's machine-readable outputs, shipped in the package (``distillctl schema NAME``).

``summary`` (<run>/summary.json, ``run --json``), ``model_card`` (export/model_card.json), ``bench``
(``bench --json``), ``bundle_manifest`` (a release bundle's manifest.json). Tests validate real outputs against
them (tests/ci/test_ci_schemas.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).parent


def names() -> list[str]:
    return sorted(path.name[: -len(".schema.json")] for path in SCHEMA_DIR.glob("*.schema.json"))


def load(name: str) -> dict[str, Any]:
    """The schema ``name`` (UsageError listing the valid names when unknown)."""
    path = SCHEMA_DIR / f"{name}.schema.json"
    if not path.is_file():
        from distillctl.errors import unknown_name

        raise unknown_name("schema", name, names())
    return json.loads(path.read_text(encoding="utf-8"))


def validate(instance: Any, name: str) -> None:
    """Raise ``jsonschema.ValidationError`` when ``instance`` does not follow schema ``name`` (needs jsonschema,
    in the dev extras)."""
    import jsonschema

    jsonschema.validate(instance, load(name), cls=jsonschema.Draft202012Validator)
