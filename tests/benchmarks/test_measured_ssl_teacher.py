"""The SSL-teacher cells (the mission's case: distilling a self-supervised teacher) reach `distillctl methods show`
and the README's "Which method?" section, each against its own teacher's kNN, never the supervised one's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def _row(method: str, teacher: str, budget: int, knn: float, **extra) -> dict:
    return {"method": method, "budget": budget, "knn_top1": knn, "linear_top1": knn + 1, "kind": "distill",
            "status": "done", "teacher": teacher, "preset": "auto", "lr": 0.05, **extra}


def _quality() -> dict:
    weak = {"method": "mocov2", "student": "resnet18", "budget": 6400, "knn_top1": 28.7}
    strong = {"method": "simclr", "student": "resnet18", "budget": 1000000, "knn_top1": 58.2}
    rows = {"a": _row("dlkd", "sup", 120000, 68.0),
            "b": _row("dlkd", "ssl", 120000, 51.5, ssl_teacher_ref=strong),
            "c": _row("seed", "ssl", 120000, 42.9, ssl_teacher_ref=strong),
            "d": _row("smd", "ssl", 30000, 14.3, ssl_teacher_ref=strong, collapse={"step": 20}),
            "e": _row("simreg", "ssl", 6400, 20.1, ssl_teacher_ref=weak),
            "f": {**_row("pcd", "ssl", 120000, 0.0, ssl_teacher_ref=strong), "status": "failed"}}
    return {"rows": rows, "machine": {"git_commit": "abc1234", "date_utc": "2026-01-01 00:00 UTC"},
            "config": {"budget_images": 120000, "batch_size": 64, "image_size": 64, "seed": 0,
                       "students": "mobilenetv2_100", "train_images": 10000, "test_images": 2000,
                       "data": {"train": "train10k", "test": "test2k"}},
            "reference": {"teacher_knn": {"sup": 86.0}, "random": {"knn_top1": 22.5}}}


def test_ssl_teacher_cells_are_measured_against_their_own_teacher():
    import render

    q = _quality()
    data = json.loads(json.dumps(render.measured_data(q, render.quality_facts(q))))
    dlkd = data["methods"]["dlkd"]
    assert [c["knn_top1"] for c in dlkd["cells"]] == [68.0]  # the supervised table is untouched
    assert dlkd["ssl_teacher"] == [{
        "images_seen": 120000, "knn_top1": 51.5, "linear_top1": 52.5, "teacher": "ResNet-18 SSL (simclr, 1,000,000 images)",
        "teacher_knn_top1": 58.2, "student_teacher": 0.885, "lr": 0.05, "preset": "auto", "collapsed": False}]
    assert "pcd" not in data["methods"]  # a failed cell measured nothing
    assert data["methods"]["simreg"]["ssl_teacher"][0]["teacher_knn_top1"] == 28.7
    line = render.ssl_teacher_line(data["methods"])
    # only the strongest SSL teacher, per budget best first; the ratio from the unrounded kNNs (0.8849 → 0.88)
    assert "simclr, 1,000,000 images), kNN 58.2" in line and "simreg" not in line
    assert line.endswith("at 30,000 images seen: smd [auto] 14.3 (0.25) (collapsed); at 120,000 images seen: "
                         "dlkd [auto] 51.5 (0.88), seed [auto] 42.9 (0.74).")
    assert line in render.which_method_section(data)


def test_methods_show_lines_for_ssl_teacher_cells():
    import render

    from distillctl.methods import measured

    q = _quality()
    data = json.loads(json.dumps(render.measured_data(q, render.quality_facts(q))))
    assert measured.ssl_teacher_summary(data, "dlkd") == [
        "120k 51.5 (0.88 of ResNet-18 SSL (simclr, 1,000,000 images), kNN 58.2)"]
    assert measured.ssl_teacher_summary(data, "smd") == [
        "30k 14.3 (0.25 of ResNet-18 SSL (simclr, 1,000,000 images), kNN 58.2) (collapsed)"]
    assert measured.ssl_teacher_summary(data, "compress-1q") == []
    assert render.ssl_teacher_line({"x": {"cells": []}}) is None


def test_readme_budget_table_ratio_comes_from_the_unrounded_knns():
    """The README's per-budget ratios agree with RESULTS.md: 82.15 / 86.0 = 0.9552 prints 0.96, not the 0.95 that
    measured.json's ratio (rounded to 0.955 first) would give."""
    import render

    cell = {"knn_top1": 82.15, "student_teacher": round(82.15 / 86.0, 3)}
    assert cell["student_teacher"] == 0.955 and f"{cell['student_teacher']:.2f}" == "0.95"
    assert render._ratio_text(cell, 86.0) == " (0.96)"
    assert render._ratio_text(cell, None) == " (0.95)"  # no reference teacher: the packaged ratio
    assert render._ratio_text({"knn_top1": 30.0, "student_teacher": None}, 86.0) == ""  # an SSL-only cell
