"""Python API for pipelines written in Python: the same stages and errors as the CLI, without a subprocess.

```python
import distillctl

summary = distillctl.run("quickstart", overrides={"train.epochs": 5, "gates.min_student_knn": 60})
print(summary.student_knn, summary.gates_passed)
distillctl.export(summary.run_dir, formats=["onnx", "onnx-int8"], bundle="release/")
distillctl.evaluate(summary.run_dir / "export" / "student.int8.onnx")
```

Every function raises the :mod:`distillctl.errors` classes the CLI maps to exit codes (``UsageError``/``InputError``
→ 2, ``GateError`` → 3, ``TrainingError`` → 1, ``Preempted`` → 4); ``exc.exit_code`` carries the code. A failed
gate raises after summary.json is complete, so the caller can still read what was measured (``read_summary``).
``distillctl run`` is a thin wrapper over :func:`run`. Heavy modules are imported inside the functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distillctl.config import Recipe

__all__ = ["Summary", "run", "export", "evaluate", "gate", "bundle", "verify", "read_summary"]


@dataclass(frozen=True)
class Summary:
    """A run's ``summary.json`` with typed accessors for what pipelines branch on; ``data`` is the full dict
    (the schema: ``distillctl schema summary``)."""

    data: dict[str, Any] = field(repr=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.data["run_dir"])

    @property
    def method(self) -> str:
        return self.data["method"]

    @property
    def student_knn(self) -> float | None:
        return (self.data.get("student") or {}).get("knn_top1")

    @property
    def teacher_knn(self) -> float | None:
        return (self.data.get("teacher") or {}).get("knn_top1")

    @property
    def gates(self) -> dict[str, Any]:
        return self.data.get("gates") or {}

    @property
    def gates_passed(self) -> bool:
        return bool(self.gates.get("passed", True))

    @property
    def export(self) -> dict[str, Any]:
        return self.data.get("export") or {}

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


def _overrides(overrides: Mapping[str, Any] | Iterable[str] | None) -> tuple[dict[str, Any], list[str]]:
    """Typed ``{"train.epochs": 5}`` overrides, or ``["train.epochs=5"]`` strings parsed like ``--set``."""
    if overrides is None:
        return {}, []
    if isinstance(overrides, Mapping):
        return dict(overrides), []
    if isinstance(overrides, str):
        return {}, [overrides]
    return {}, list(overrides)


def run(recipe: str | Path | Mapping[str, Any] | Recipe | None = None,
        overrides: Mapping[str, Any] | Iterable[str] | None = None, *,
        sets: Iterable[str] = (), resume: bool = False, restart: bool = False, quiet: bool = False) -> Summary:
    """Run teacher → cache → distill → eval → export → gates and return the summary.

    ``recipe``: a shipped recipe name (``"quickstart"``), a YAML path, a mapping of recipe sections, a
    :class:`distillctl.config.Recipe`, or None (defaults). ``overrides``: dotted keys with typed values (``{"train.epochs": 5}``) or ``key=value`` strings;
    ``sets`` are ``--set`` strings applied last. Finished stages with unchanged inputs are skipped, so changing
    only ``gates.*`` re-checks without retraining. Raises GateError (exit code 3) when a gate fails.
    """
    from distillctl.config import Recipe, build_recipe, load_recipe
    from distillctl.errors import UsageError
    from distillctl.pipeline import RunOptions, run_pipeline

    if resume and restart:
        raise UsageError("resume and restart are mutually exclusive")
    typed, texts = _overrides(overrides)
    if isinstance(recipe, Recipe):
        resolved = build_recipe(recipe.model_dump(mode="json"), typed, sets=[*texts, *sets]) if typed or texts or sets \
            else recipe
    elif isinstance(recipe, Mapping):
        resolved = build_recipe(dict(recipe), typed, sets=[*texts, *sets])
    else:
        resolved = load_recipe(str(recipe) if recipe is not None else None, typed, sets=[*texts, *sets])
    return Summary(run_pipeline(resolved, RunOptions(resume=resume, restart=restart, quiet=quiet)))


def export(run_dir: str | Path, formats: Iterable[str] = ("onnx",), *, bundle: str | Path | None = None,
           **options: Any) -> dict[str, Any]:
    """(Re-)export a finished run behind the parity/accuracy gates; the per-format report.

    ``options`` are the recipe's ``export`` section fields (``calib_size``, ``calib_method``, ``max_drop``,
    ``parity_images``, …, see :class:`distillctl.config.ExportConfig`) plus the split overrides ``data``,
    ``val_data``, ``crop_pct`` and ``max_bad_fraction``. With ``bundle``, also write the release bundle there (see
    :func:`bundle`); the report then carries ``bundle`` (its path and manifest digest).
    """
    from distillctl.export.api import export_config, export_run

    run_dir = _require_dir(run_dir)
    splits = {key: options.pop(key) for key in ("data", "val_data", "max_bad_fraction", "crop_pct") if key in options}
    report = export_run(run_dir, export_config(list(formats), **options), **splits)
    if bundle is not None:
        report["bundle"] = globals()["bundle"](run_dir, bundle)
    return report


def bundle(run_dir: str | Path, out: str | Path, *, samples: int = 8) -> dict[str, Any]:
    """Write the release bundle of an exported run into ``out`` (deterministic bytes); returns its description."""
    from distillctl.export.bundle import write_bundle

    return write_bundle(_require_dir(run_dir), Path(out), samples=samples)


def verify(bundle_dir: str | Path) -> dict[str, Any]:
    """Re-hash every file of a release bundle and re-run parity on its samples; GateError (3) on any mismatch."""
    from distillctl.export.bundle import verify_bundle

    return verify_bundle(Path(bundle_dir))


def evaluate(target: str | Path, *, data: str | None = None, val_data: str | None = None,
             k: Iterable[int] | None = None, temperature: float | None = None, batch_size: int = 256,
             device: str = "auto", crop_pct: float | None = None) -> dict[str, Any]:
    """Weighted kNN of a run, a student directory, an exported ``.onnx`` or ``teacher:<name>`` under the run's
    protocol (``distillctl eval knn --json``'s report; also recorded in the run's summary.json)."""
    from distillctl.eval.cli import knn_report

    ks = ",".join(str(int(value)) for value in k) if k is not None else None
    report, _, _ = knn_report(str(target), data, val_data, ks, temperature, batch_size, device, None, crop_pct)
    return report


def gate(run_dir: str | Path, gates: Mapping[str, Any] | None = None, *, raise_on_failure: bool = True) -> dict[str, Any]:
    """Check quality gates against a finished run (the recipe's, updated with ``gates``, e.g.
    ``{"min_student_knn": 80}``); records summary['gates'] and returns it; GateError (3) when one failed."""
    from distillctl.gates import GatesConfig, check_run
    from distillctl.rundir import RunDir

    run = RunDir(_require_dir(run_dir)).require()
    config = run.recipe().gates
    if gates:
        config = GatesConfig(**{**config.model_dump(), **dict(gates)})
    return check_run(run.path, config, raise_on_failure=raise_on_failure)


def read_summary(run_dir: str | Path) -> Summary:
    """The summary.json of a run (complete whatever the run's exit code)."""
    from distillctl.errors import InputError

    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    return Summary(json.loads(path.read_text()))


def _require_dir(path: str | Path) -> Path:
    from distillctl.errors import InputError

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"run directory does not exist: {path}")
    return path
