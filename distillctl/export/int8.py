"""Choosing the INT8 calibration of a student: the task-level accuracy budget decides.

For each calibration method (``auto``: minmax, percentile and entropy; or the one asked for) the
CPU-form artefact is written and its embedding parity measured. Candidates are ranked by
(passes the cosine floor, mean cosine); the kNN accuracy budget is then evaluated in that order and
the first candidate that passes both is kept. If none does, the layers whose own quantization adds
the most error (:mod:`distillctl.export.sensitivity`) are left in float — 1, 2, 4, then 8 of them
(never more than a quarter of the weighted layers) — until a candidate passes. Every try is recorded
(method, excluded layers, cosines, kNN drop), and only the chosen artefact stays on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distillctl.export.parity import ParityResult, check_parity, ort_runner
from distillctl.export.quantize import Int8Quantizer, QuantizationInfo

EXCLUSION_STEPS = (1, 2, 4, 8)


@dataclass
class Candidate:
    """One INT8 artefact tried during the selection."""

    method: str
    exclude: list[str]
    info: QuantizationInfo
    parity: ParityResult
    accuracy: Any = None  # AccuracyReport once evaluated
    sensitivity: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.parity.passed and self.accuracy is not None and self.accuracy.passed)

    def record(self) -> dict:
        row = {"method": self.method, "excluded_nodes": list(self.exclude), "mean_cosine": self.parity.mean_cosine,
               "p1_cosine": self.parity.p1_cosine, "cosine_floor_passed": self.parity.passed}
        if self.accuracy is not None:
            row.update(knn_drop=self.accuracy.drop, accuracy_passed=self.accuracy.passed)
        return row


def select_int8(
    quantizer: Int8Quantizer,
    model: Any,
    parity_set: Any,
    work_dir: Path,
    *,
    methods: tuple[str, ...] | list[str],
    form: str,
    accuracy_of: Callable[[str], Any],
    exclude_sensitive: bool = True,
) -> tuple[Candidate, list[dict]]:
    """The chosen CPU-form candidate (its file still at ``candidate.info.path``) and the record of every try."""
    tried: list[Candidate] = []
    try:
        chosen = _select(quantizer, model, parity_set, work_dir, list(methods), form, accuracy_of, exclude_sensitive,
                         tried)
    except BaseException:
        _remove(tried, keep=None)
        raise
    _remove(tried, keep=chosen)
    return chosen, [candidate.record() for candidate in tried]


def _select(quantizer, model, parity_set, work_dir, methods, form, accuracy_of, exclude_sensitive, tried) -> Candidate:
    def attempt(method: str, exclude: list[str]) -> Candidate:
        suffix = f"-x{len(exclude)}" if exclude else ""
        info = quantizer.write(work_dir / f".int8-try-{method}{suffix}.onnx", method=method, form=form,
                               exclude=exclude)
        candidate = Candidate(method, list(exclude), info,
                              check_parity(model, ort_runner(info.path), parity_set, precision="int8"))
        tried.append(candidate)
        return candidate

    ranked = sorted((attempt(method, []) for method in methods),
                    key=lambda c: (c.parity.passed, c.parity.mean_cosine), reverse=True)
    for candidate in ranked:
        if candidate.parity.passed or candidate is ranked[0]:
            candidate.accuracy = accuracy_of(candidate.info.path)
            if candidate.passed:
                return candidate
    best = ranked[0]
    if exclude_sensitive:
        ranking = _sensitivity(quantizer, best, work_dir)
        limit = max(1, len(ranking) // 4)
        for count in sorted({min(step, limit) for step in EXCLUSION_STEPS}):
            candidate = attempt(best.method, [row["node"] for row in ranking[:count]])
            candidate.sensitivity = ranking[:10]
            if candidate.parity.passed or not best.parity.passed:
                candidate.accuracy = accuracy_of(candidate.info.path)
                if candidate.passed:
                    return candidate
    evaluated = [c for c in tried if c.accuracy is not None]
    return min(evaluated, key=lambda c: (not c.parity.passed, c.accuracy.drop, -c.parity.mean_cosine))


def _sensitivity(quantizer: Int8Quantizer, best: Candidate, work_dir: Path) -> list[dict]:
    """Layer ranking of ``best``'s calibration on calibration images, measured on a Q/DQ copy when ``best``
    is a QOperator graph (which hides the float tensors)."""
    from distillctl.export.quantize import FORMS
    from distillctl.export.sensitivity import layer_sensitivity

    images = quantizer.images
    if FORMS[best.info.form].format == "QDQ":
        return layer_sensitivity(quantizer.prepared, best.info.path, images)
    probe = work_dir / ".int8-sensitivity-probe.onnx"
    try:
        info = quantizer.write(probe, method=best.method, form="qdq-u8s8")
        return layer_sensitivity(quantizer.prepared, info.path, images)
    finally:
        probe.unlink(missing_ok=True)


def _remove(tried: list[Candidate], keep: Candidate | None) -> None:
    for candidate in tried:
        if candidate is not keep:
            Path(candidate.info.path).unlink(missing_ok=True)
