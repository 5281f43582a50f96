"""Quality gates: the recipe's ``gates:`` section, checked at the end of ``run`` and by ``distillctl gate RUN``.

A CI pipeline that trains an edge model on every change must refuse to ship a worse one. The gates compare
what the run measured (``summary.json``) with thresholds in the recipe::

    gates:
      min_student_knn: 70.0            # student kNN top-1 (%, the run's kNN protocol)
      min_student_teacher_ratio: 0.8   # student kNN / teacher kNN
      max_int8_drop: 1.0               # INT8 kNN top-1 drop vs fp32 ONNX, points (needs export onnx-int8)
      max_latency_ms: 5.0              # p50 latency of one format, measured when the gates are checked
      latency: {format: onnx, batch: 1, threads: 1}

Gates never enter a stage fingerprint: changing only the gates re-checks a finished run without retraining.
Every gate reports its threshold, measured value and margin (positive: headroom, negative: missed by); the
report lands in ``summary.json`` under ``gates``; a failed gate raises :class:`GateError` (exit 3) naming each
failed gate. This module imports no torch at import time (the recipe model imports it).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from distillctl.errors import GateError, InputError, UsageError

# every CPU format `distillctl bench` times (the TensorRT engine needs a GPU and is benchmarked, not gated)
LatencyFormat = Literal["torch", "onnx", "onnx-int8", "onnx-fp16", "openvino", "openvino-int8"]
LATENCY_FORMATS: tuple[str, ...] = get_args(LatencyFormat)


class LatencyGateSpec(BaseModel):
    """How ``max_latency_ms`` is measured: one format at one batch size on a fixed number of CPU threads."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    format: LatencyFormat = "onnx"
    batch: int = Field(1, ge=1, le=4096)
    threads: int = Field(1, ge=1, le=512)
    repeats: int = Field(30, ge=1, le=10000)
    warmup: int = Field(5, ge=0, le=1000)


class GatesConfig(BaseModel):
    """Recipe ``gates:``. A gate left at ``null`` is not checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    min_student_knn: float | None = Field(None, ge=0, le=100)
    min_student_teacher_ratio: float | None = Field(None, ge=0)
    max_int8_drop: float | None = Field(None, ge=0)
    max_latency_ms: float | None = Field(None, gt=0)
    latency: LatencyGateSpec = Field(default_factory=LatencyGateSpec)

    def active(self) -> list[str]:
        return [name for name in GATE_NAMES if getattr(self, name) is not None]


GATE_NAMES = ("min_student_knn", "min_student_teacher_ratio", "max_int8_drop", "max_latency_ms")


@dataclass
class GateResult:
    """One checked gate. ``margin`` is measured - threshold for a minimum, threshold - measured for a maximum,
    so a negative margin is always the amount by which the gate was missed."""

    name: str
    threshold: float
    measured: float | None
    margin: float | None
    passed: bool
    unit: str
    detail: str = ""

    def line(self) -> str:
        if self.measured is None:
            return f"{self.name}: not measured ({self.detail})"
        relation = ">=" if self.name.startswith("min_") else "<="
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.name}: measured {_fmt(self.measured)}{self.unit}, required {relation} {_fmt(self.threshold)}"
                f"{self.unit}, margin {self.margin:+.4g}{self.unit} ({verdict})")


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def check_recipe_gates(recipe) -> None:
    """Refuse (exit 2, before any work) gates the recipe cannot measure."""
    gates: GatesConfig = recipe.gates
    formats = set(recipe.export.formats) if recipe.export.enabled else set()
    if gates.max_int8_drop is not None and "onnx-int8" not in formats:
        raise UsageError("gates.max_int8_drop needs the INT8 export; add onnx-int8 to export.formats",
                         hint="--export onnx,onnx-int8 (or --set export.formats=[onnx,onnx-int8])")
    if gates.max_latency_ms is not None and gates.latency.format != "torch" and gates.latency.format not in formats:
        raise UsageError(f"gates.latency.format={gates.latency.format} is not exported by this recipe "
                         f"(export.formats: {', '.join(sorted(formats)) or 'none'})",
                         hint=f"add {gates.latency.format} to export.formats or set gates.latency.format=torch")


def evaluate_gates(gates: GatesConfig, summary: dict[str, Any], run_dir: Path) -> list[GateResult]:
    """Measure (or read from ``summary``) every active gate; nothing is raised here."""
    results = []
    for name in gates.active():
        threshold = float(getattr(gates, name))
        measured, unit, detail = _MEASURE[name](gates, summary, run_dir)
        if measured is None:
            results.append(GateResult(name, threshold, None, None, False, unit, detail))
            continue
        margin = measured - threshold if name.startswith("min_") else threshold - measured
        results.append(GateResult(name, threshold, round(measured, 6), round(margin, 6), margin >= 0, unit, detail))
    return results


def _student_knn(gates, summary, run_dir):
    value = (summary.get("student") or {}).get("knn_top1")
    return value, "%", "" if value is not None else "the run has no student kNN (no labelled eval split)"


def _ratio(gates, summary, run_dir):
    student = (summary.get("student") or {}).get("knn_top1")
    teacher = (summary.get("teacher") or {}).get("knn_top1")
    if student is None or not teacher:
        return None, "", "needs both student and teacher kNN (eval.teacher: true and a labelled eval split)"
    return student / teacher, "", f"student {student:.2f}% / teacher {teacher:.2f}%"


def _int8_drop(gates, summary, run_dir):
    accuracy = ((summary.get("export") or {}).get("onnx-int8") or {}).get("accuracy") or {}
    drop = accuracy.get("drop")
    if drop is None:
        return None, " pt", "no INT8 accuracy in summary.json: export with --format onnx,onnx-int8"
    return float(drop), " pt", f"fp32 {accuracy.get('reference_top1')}% -> int8 {accuracy.get('candidate_top1')}%"


def _latency(gates, summary, run_dir):
    spec = gates.latency
    try:
        row = measure_latency(run_dir, spec)
    except (InputError, UsageError) as exc:  # e.g. the artefact of that format was not exported
        return None, " ms", exc.message
    return row["p50_ms"], " ms", (f"p50 of {spec.repeats} calls, {spec.format} batch {spec.batch} "
                                  f"on {spec.threads} thread(s), {row['device']}")


_MEASURE = {"min_student_knn": _student_knn, "min_student_teacher_ratio": _ratio, "max_int8_drop": _int8_drop,
            "max_latency_ms": _latency}


def measure_latency(run_dir: Path, spec: LatencyGateSpec) -> dict[str, Any]:
    """p50/p90 of one (format, batch) with torch and ONNX Runtime both held to ``spec.threads`` threads."""
    import torch

    from distillctl.export.bench import bench_run

    previous = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        rows = bench_run(run_dir, [spec.format], [spec.batch], repeats=spec.repeats, warmup=spec.warmup, device="cpu")
    finally:
        torch.set_num_threads(previous)
    return rows[0]


def gates_report(results: list[GateResult], gates: GatesConfig) -> dict[str, Any]:
    """The ``summary.json['gates']`` section."""
    return {"passed": all(result.passed for result in results), "checked": len(results),
            "failed": [result.name for result in results if not result.passed],
            "results": {result.name: asdict(result) for result in results},
            "config": gates.model_dump(mode="json"),
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def failure(results: list[GateResult]) -> GateError | None:
    """One GateError naming every failed gate with its measured value and margin (None when all passed)."""
    failed = [result for result in results if not result.passed]
    if not failed:
        return None
    noun = "gate" if len(failed) == 1 else "gates"
    return GateError(f"{len(failed)} quality {noun} failed: " + " | ".join(result.line() for result in failed),
                     hint="the measured values are in summary.json under 'gates'; change the recipe's gates: and rerun "
                          "(finished stages are skipped) or run: distillctl gate RUN")


def failure_from_report(report: dict[str, Any]) -> GateError | None:
    """:func:`failure` of a report read back from summary.json (how other ranks and ``gate`` see it)."""
    return failure([GateResult(**entry) for entry in (report.get("results") or {}).values()])


def check_run(run_dir: str | Path, gates: GatesConfig | None = None, *, raise_on_failure: bool = True) -> dict[str, Any]:
    """Check ``gates`` (default: the run's recipe ``gates:``) against the run's summary.json; record the report
    under ``summary['gates']`` and return it. Raises GateError (exit 3) after writing when a gate failed."""
    from distillctl.rundir import RunDir
    from distillctl.runlock import hold

    run = RunDir(run_dir).require()
    with hold(run.path, create=False):  # summary.json is rewritten: one writer per run directory
        return _check_run(run, gates, raise_on_failure)


def _check_run(run, gates: GatesConfig | None, raise_on_failure: bool) -> dict[str, Any]:
    summary = run.summary()
    if not summary:
        raise InputError(f"{run.path} has no summary.json: the run has not finished a stage yet",
                         hint=f"run it first: distillctl run --recipe {run.path / 'recipe.yaml'}")
    gates = gates or run.recipe().gates
    results = evaluate_gates(gates, summary, run.path)
    report = gates_report(results, gates)
    write_gates(run, report)
    error = failure(results)
    if error is not None and raise_on_failure:
        raise error
    return report


def write_gates(run, report: dict[str, Any]) -> None:
    """Replace ``summary['gates']`` (not merged: an old gate must not survive a recipe that dropped it)."""
    from distillctl.export.card import write_json_atomic

    summary = run.summary()
    summary["gates"] = report
    write_json_atomic(run.path / "summary.json", summary)


def gates_from_overrides(base: GatesConfig, overrides: list[str]) -> GatesConfig:
    """``distillctl gate RUN --set gates.min_student_knn=80``: only ``gates.*`` keys, validated like the recipe."""
    from pydantic import ValidationError

    from distillctl.config import apply_overrides, format_validation_error

    data = {"gates": base.model_dump(mode="json")}
    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith("gates."):
            raise UsageError(f"distillctl gate --set takes gates.* keys only, got '{item}'",
                             hint="e.g. --set gates.min_student_knn=75")
    apply_overrides(data, overrides)
    try:
        return GatesConfig(**data["gates"])
    except ValidationError as exc:
        raise format_validation_error(exc, GatesConfig, prefix="gates") from None
