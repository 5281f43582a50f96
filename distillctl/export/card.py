"""Model card: what an exported student is, where it came from, and how well it was verified.

``export/model_card.json`` is authoritative (it also lists every artefact with its sha256). A copy
without the artefact list is embedded in each ONNX file's ``metadata_props`` (values must be
strings): one key per top-level field, ``distillctl.<field>``, holding a string or a JSON string,
so the file describes itself even when it travels alone.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from distillctl._infra import sha256_file  # noqa: F401  (re-exported: artefact hashes in the card)
from distillctl.export._fs import write_bytes_atomic

SCHEMA_VERSION = 1
METADATA_PREFIX = "distillctl."
_VERSIONED_PACKAGES = ("torch", "timm", "torchvision", "onnx", "onnxscript", "onnxruntime", "numpy", "tensorrt")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages an artefact depends on (absent ones are left out)."""
    from distillctl import __version__

    versions = {"distillctl": __version__}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions




def created_stamp(student_file: Path) -> str:
    """The card's ``created``: ``SOURCE_DATE_EPOCH`` when set (reproducible builds), else the time the student file
    was written. Not the export's wall clock: re-exporting the same run must give the same bytes (release bundles)."""
    import os

    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    seconds = int(epoch) if epoch.isdigit() else int(Path(student_file).stat().st_mtime)
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_model_card(
    *,
    student: dict[str, Any],
    teacher: dict[str, Any],
    method: str,
    input_spec: dict[str, Any],
    output_spec: dict[str, Any],
    data: dict[str, Any],
    export: dict[str, Any],
    evaluation: dict[str, Any],
    parity: dict[str, Any],
    quantization: dict[str, Any] | None = None,
    engines: dict[str, Any] | None = None,
    license: str | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    """Assemble the card; every argument is already a plain JSON-able dict (``created``: see :func:`created_stamp`)."""
    card: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": created or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "description": f"{student.get('arch')} student distilled from {teacher.get('name')} with {method}; "
                       f"input '{input_spec.get('name')}' NCHW float32 RGB normalised, output '{output_spec.get('name')}'",
        "license": license,
        "teacher": teacher,
        "student": student,
        "method": method,
        "input": input_spec,
        "output": output_spec,
        "data": data,
        "export": {**export, "versions": package_versions()},
        "eval": evaluation,
        "parity": parity,
    }
    if quantization:
        card["quantization"] = quantization
    if engines:
        card["engines"] = engines
    return card


def card_to_metadata(card: dict[str, Any]) -> dict[str, str]:
    """Flatten a card to ``metadata_props``: ``distillctl.<field>`` → string or JSON string."""
    props: dict[str, str] = {}
    for key, value in card.items():
        if key == "artifacts" or value is None:
            continue  # artefact hashes would change the file they describe
        props[METADATA_PREFIX + key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    # Flat preprocessing keys, read by distillctl.eval (and easy for any runtime to pick up).
    for field in ("size", "mean", "std", "crop_pct"):
        if isinstance(card.get("input"), dict) and field in card["input"]:
            props[f"{METADATA_PREFIX}input.{field}"] = json.dumps(card["input"][field])
    return props


def artifact_metadata(format_name: str, file_name: str, quantization: dict[str, Any] | None = None) -> dict[str, str]:
    """``distillctl.artifact``: which of the card's artefacts this file is (format, and INT8 form if any)."""
    entry: dict[str, Any] = {"format": format_name, "file": file_name}
    if quantization:
        entry["int8"] = {key: quantization[key] for key in ("form", "format", "activation_type", "weight_type",
                                                            "per_channel", "symmetric", "reduce_range", "runtime",
                                                            "calibration_method", "excluded_nodes", "preset",
                                                            "fast_bias_correction", "ignored_nodes")
                         if key in quantization}
    return {METADATA_PREFIX + "artifact": json.dumps(entry, sort_keys=True)}


def metadata_to_card(props: dict[str, str]) -> dict[str, Any]:
    """Inverse of :func:`card_to_metadata` (JSON values decoded, plain strings kept)."""
    card: dict[str, Any] = {}
    for key, value in props.items():
        if not key.startswith(METADATA_PREFIX):
            continue
        field = key[len(METADATA_PREFIX):]
        if "." in field:
            continue  # flat convenience copies of nested fields
        try:
            card[field] = json.loads(value)
        except json.JSONDecodeError:
            card[field] = value
    return card


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON to a temp file in the same directory, then rename over ``path``."""
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_model_card(path: str | Path, card: dict[str, Any], artifacts: list[Path]) -> Path:
    """Write ``model_card.json`` with the sha256 and size of each artefact (last: it vouches for them)."""
    card = dict(card)
    card["artifacts"] = {
        artifact.name: {"sha256": sha256_file(artifact), "size_bytes": artifact.stat().st_size}
        for artifact in artifacts if artifact.is_file()
    }
    return write_json_atomic(path, card)
