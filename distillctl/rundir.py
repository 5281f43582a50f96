"""The run directory: layout, stage manifest with fingerprints, summary updates (all atomic).

```
<run>/recipe.yaml            fully resolved recipe
<run>/manifest.json          stages {teacher, cache, distill, eval, export}: fingerprint, status, result
<run>/summary.json           the single machine-readable result (architecture contract)
<run>/metrics.jsonl          one JSON object per logged step
<run>/teacher/               converted or pretrained teacher (safetensors + config.json)
<run>/student/               model.safetensors, config.json, heads.safetensors (train-only heads)
<run>/distill/checkpoints/   resumable training checkpoints
<run>/export/                ONNX artefacts and model_card.json
```
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePath
from typing import Any

from distillctl._infra import atomic_write_text, sha256_file
from distillctl.errors import InputError


def fingerprint(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (stage inputs).

    Fingerprints are taken over content (hashes, settings), never over where files lie: a run directory that was
    moved or copied must skip its finished stages. A ``Path`` among the parts is therefore a programming error.
    """
    blob = json.dumps(parts, sort_keys=True, default=_content_only).encode()
    return hashlib.sha256(blob).hexdigest()


def _content_only(value: Any) -> str:
    if isinstance(value, PurePath):
        raise TypeError(f"a stage fingerprint must not contain a path ({value}); hash the file's content instead")
    return str(value)


LOCATION_KEYS = frozenset({"source", "path", "run_dir"})


def content_identity(described: Any) -> Any:
    """``described`` (e.g. ``Teacher.describe()``) without the keys that say where something was read from:
    the content (sha256, architecture, dimensions) identifies it; ``pretrain:/abs/run`` or a typed path do not."""
    if isinstance(described, dict):
        return {k: content_identity(v) for k, v in described.items() if k not in LOCATION_KEYS}
    if isinstance(described, list):
        return [content_identity(v) for v in described]
    return described


file_sha256 = sha256_file  # the name this module has always exported


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # --- layout -----------------------------------------------------------------------------
    @property
    def student_dir(self) -> Path:
        return self.path / "student"

    @property
    def teacher_dir(self) -> Path:
        return self.path / "teacher"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def exists(self) -> bool:
        return (self.path / "manifest.json").is_file() or (self.path / "recipe.yaml").is_file()

    def require(self) -> "RunDir":
        if not self.path.is_dir():
            raise InputError(f"run directory not found: {self.path}")
        if not (self.path / "recipe.yaml").is_file():
            raise InputError(f"{self.path} is not a distillctl run directory (no recipe.yaml)")
        return self

    # --- recipe -----------------------------------------------------------------------------
    def recipe(self):
        from distillctl.config import build_recipe, read_yaml

        return build_recipe(read_yaml(self.require().path / "recipe.yaml"))

    def write_recipe(self, recipe) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "recipe.yaml", recipe.to_yaml())

    def eval_data(self) -> tuple[str, str | None, float]:
        """(train source, labelled eval source or None, crop_pct) used by this run's evaluation."""
        from distillctl.data.datasets import resolve_splits

        recipe = self.recipe()
        train, val = resolve_splits(recipe.data.train, recipe.data.val)
        return train, val, recipe.data.crop_pct

    # --- manifest ---------------------------------------------------------------------------
    def manifest(self) -> dict:
        path = self.path / "manifest.json"
        if not path.is_file():
            return {"stages": {}}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is corrupt (not JSON)", hint="remove the run directory or use a new --out") from exc

    def stage(self, name: str) -> dict | None:
        return self.manifest()["stages"].get(name)

    def stage_done(self, name: str, stage_fingerprint: str) -> bool:
        entry = self.stage(name)
        return bool(entry and entry.get("status") == "done" and entry.get("fingerprint") == stage_fingerprint)

    def record_stage(self, name: str, stage_fingerprint: str, status: str, result: dict | None = None) -> None:
        manifest = self.manifest()
        manifest["stages"][name] = {"fingerprint": stage_fingerprint, "status": status, "result": result or {}}
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True, default=str))

    # --- summary ----------------------------------------------------------------------------
    def summary(self) -> dict:
        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_summary(self, patch: dict) -> dict:
        summary = self.summary()
        _deep_merge(summary, patch)
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str))
        return summary


def _deep_merge(target: dict, patch: dict) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = value
