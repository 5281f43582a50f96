"""``distillctl teacher verify``: re-hash a cached teacher and re-run its structural check.

Everything that fails here is a verification gate (exit 3): a raw file whose sha256 no longer
matches the pinned/locked value (it is moved aside), a raw file that no longer converts, or a
converted store that differs from what the raw file converts to.
"""

from __future__ import annotations

from typing import Any

import torch

from distillctl.errors import GateError, InputError
from distillctl.teachers.fetch import check_file, expected_hash, teacher_dir
from distillctl.teachers.registry import TeacherEntry
from distillctl.teachers.resolve import _convert_entry_file
from distillctl.teachers.store import load_converted, read_manifest


def verify_entry(entry: TeacherEntry) -> dict[str, Any]:
    """Verify the raw file (hash + structure) and the converted store (hash + equality); raise GateError."""
    folder = teacher_dir(entry.name)
    raw = folder / entry.filename
    manifest = read_manifest(folder)
    if manifest is None and not raw.is_file():
        raise InputError(f"teacher '{entry.name}' is not in the cache ({folder})",
                         hint=f"distillctl teacher download {entry.name}")
    result: dict[str, Any] = {"name": entry.name, "raw": None, "converted": None}
    checks = []
    backbone = None
    if raw.is_file() and not entry.needs_explicit_convert:
        md5 = entry.published_hash.md5_prefix if entry.published_hash else None
        expected = expected_hash(entry.name, entry.sha256, None, md5, entry.size)
        expected.sha256_prefix = entry.published_hash.sha256_prefix if entry.published_hash else None
        if expected.sha256 is None:
            raise GateError(f"teacher '{entry.name}' has no pinned or recorded sha256 to verify against",
                            hint=f"re-import it with a known hash: distillctl teacher import {entry.name} FILE --sha256 HEX")
        sha = check_file(raw, entry.name, expected, no_verify=False)
        try:
            backbone, head, _ = _convert_entry_file(entry, raw)
        except InputError as exc:
            raise GateError(f"teacher '{entry.name}': raw file fails the structural check: {exc.message}") from None
        result["raw"] = {"sha256": sha, "expected_from": expected.origin, "structure": "ok"}
        checks.append(f"raw sha256 matches ({expected.origin})")
        checks.append("structure ok")
    if manifest is not None:
        stored = load_converted(folder, manifest)  # re-hashes the safetensors against the manifest
        result["converted"] = {"sha256": stored.sha256}
        checks.append("converted file intact")
        if backbone is not None:
            if manifest["raw"]["sha256"] != result["raw"]["sha256"]:
                raise GateError(f"teacher '{entry.name}': converted store was made from a different raw file")
            fresh, kept = backbone.state_dict(), stored.backbone.state_dict()
            if set(fresh) != set(kept) or any(not torch.equal(fresh[k], kept[k]) for k in fresh):
                raise GateError(f"teacher '{entry.name}': converted store differs from a fresh conversion of the raw file",
                                hint=f"delete {folder} and run: distillctl teacher download {entry.name}")
            checks.append("store equals a fresh conversion")
    result["summary"] = "; ".join(checks)
    return result
