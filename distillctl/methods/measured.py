"""What the benchmark measured per method (``measured.json`` beside this module, written by
``python benchmarks/render.py`` from benchmarks/results/*.json; never typed by hand): shown by
``distillctl methods list`` (which method works best at which budget) and ``methods show`` (the lr the cells ran
with next to the published one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MEASURED = Path(__file__).with_name("measured.json")


def load(path: Path = MEASURED) -> dict[str, Any]:
    """The measured table, or an empty one when the file is missing or unreadable (a listing must not fail)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"methods": {}, "source": {}}
    return data if isinstance(data, dict) else {"methods": {}, "source": {}}


def _budget(images: int) -> str:
    return f"{images // 1000}k" if images % 1000 == 0 else f"{images:,}"


def cells(data: dict[str, Any], method: str) -> list[dict[str, Any]]:
    return list(((data.get("methods") or {}).get(method) or {}).get("cells") or [])


def dense_suite_cells(data: dict[str, Any], method: str) -> list[dict[str, Any]]:
    """The method's cells in the dense-features suite (issue 14; its own students and teachers, not ranked)."""
    return list(((data.get("methods") or {}).get(method) or {}).get("dense_suite") or [])


def summary(data: dict[str, Any], method: str) -> str:
    """``30k #1/10 37.6 · 120k #1/2 55.8``: per budget measured, the method's rank among its kind and its kNN %.

    A method the main table did not measure shows its dense-suite cells instead, marked as such and, where they
    differ from the main table's, with their student and teacher: ``30k 36.0 (dense suite)``."""
    parts = [f"{_budget(c['images_seen'])} #{c['rank']}/{c['of']} {c['knn_top1']:.1f}"
             for c in cells(data, method) if c.get("knn_top1") is not None]
    if not parts:
        parts = [f"{_budget(c['images_seen'])} {c['knn_top1']:.1f} ({_dense_origin(c)})"
                 for c in dense_suite_cells(data, method) if c.get("knn_top1") is not None]
    return " · ".join(parts) if parts else "–"


def dense_context(data: dict[str, Any], method: str) -> list[str]:
    """Per dense-suite cell of a method the main table did not measure: its kNN next to its own student at random
    init and the teacher it was distilled from, and the other methods distilled from that teacher into that
    student at that budget (the controls that tell a weak method from a weak teacher), e.g.
    ``120k 26.5: random-init student 28.2; its teacher 25.9; same teacher and student: compress-1q 23.7``."""
    if cells(data, method):
        return []
    lines = []
    for cell in dense_suite_cells(data, method):
        if cell.get("knn_top1") is None:
            continue
        known = [f"random-init student {cell['random_init_knn_top1']:.1f}"
                 if cell.get("random_init_knn_top1") is not None else "",
                 f"its teacher {cell['teacher_knn_top1']:.1f}" if cell.get("teacher_knn_top1") is not None else ""]
        peers = sorted((other, peer["knn_top1"]) for other in (data.get("methods") or {}) if other != method
                       for peer in dense_suite_cells(data, other)
                       if peer.get("knn_top1") is not None and all(peer.get(k) == cell.get(k)
                                                                   for k in ("student", "teacher", "images_seen")))
        if peers:
            known.append("same teacher and student: " + ", ".join(f"{other} {knn:.1f}" for other, knn in peers))
        known = [k for k in known if k]
        if known:
            lines.append(f"{_budget(cell['images_seen'])} {cell['knn_top1']:.1f}: " + "; ".join(known))
    return lines


def ssl_teacher_cells(data: dict[str, Any], method: str) -> list[dict[str, Any]]:
    """The method's cells distilled from a self-supervised teacher (the main table's teacher is supervised)."""
    return list(((data.get("methods") or {}).get(method) or {}).get("ssl_teacher") or [])


def ssl_teacher_summary(data: dict[str, Any], method: str) -> list[str]:
    """``120k 51.5 (0.88 of ResNet-18 SSL (simclr, 1,000,000 images), kNN 58.2)`` per SSL-teacher cell."""
    lines = []
    for cell in ssl_teacher_cells(data, method):
        if cell.get("knn_top1") is None:
            continue
        teacher_knn = cell.get("teacher_knn_top1")
        ratio = f"{cell['knn_top1'] / teacher_knn:.2f} of " if teacher_knn else ""
        knn = f", kNN {teacher_knn:.1f}" if teacher_knn else ""
        lines.append(f"{_budget(cell['images_seen'])} {cell['knn_top1']:.1f} ({ratio}{cell.get('teacher')}{knn})"
                     + (" (collapsed)" if cell.get("collapsed") else ""))
    return lines


def _dense_origin(cell: dict[str, Any]) -> str:
    """Where a dense-suite cell comes from: the main table's student and teacher, or its own (named)."""
    if cell.get("same_protocol"):
        return "dense suite"
    teacher = str(cell.get("teacher") or "–")
    return f"dense suite, {cell.get('student')} student, {teacher if 'teacher' in teacher else teacher + ' teacher'}"


def source_line(data: dict[str, Any]) -> str:
    source = data.get("source") or {}
    if not source:
        return "measured: no benchmark results packaged (python benchmarks/render.py writes them)"
    reference = data.get("reference") or {}
    floor = reference.get("random_init_knn_top1")
    teacher = reference.get("teacher_knn_top1")
    return (f"measured: kNN top-1 % at N images seen, rank among methods of the same kind, from {source.get('file')} "
            f"(commit {source.get('commit')}, {source.get('date')}); protocol: {source.get('protocol')}; "
            f"random-init student {floor if floor is not None else '–'}, teacher {teacher if teacher is not None else '–'}")


def ran_lr(data: dict[str, Any], method: str) -> str | None:
    """``0.05 (published (before method.preset))``: the lr(s) the method's benchmark cells trained with."""
    seen = sorted({(c.get("lr"), c.get("preset")) for c in cells(data, method) if c.get("lr") is not None},
                  key=lambda pair: (pair[0], str(pair[1])))
    if not seen:
        return None
    return ", ".join(f"{lr:g} ({preset})" for lr, preset in seen)
