"""`distillctl methods list` shows what the dense-features suite measured for the methods the main table did not
run (pcd, dense-reg, attndistill, mae-lite): render.py packages those cells, marked with their suite and, where
they differ from the main table's, their student and teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

VIT = "vit_tiny_patch16_224(patch_size=8)"


def _quality() -> dict:
    """A main table with one method (compress-1q at 30k), in quality.json's shape."""
    row = {"method": "compress-1q", "budget": 30000, "knn_top1": 40.0, "linear_top1": 41.0, "kind": "distill",
           "status": "done", "teacher": "sup", "command": "distillctl run --method compress-1q"}
    return {"rows": {"a": row}, "machine": {"git_commit": "abc1234", "date_utc": "2026-01-01 00:00 UTC"},
            "config": {"budget_images": 30000, "batch_size": 64, "image_size": 64, "seed": 0,
                       "students": "mobilenetv2_100", "train_images": 10000, "test_images": 2000,
                       "data": {"train": "train10k", "test": "test2k"}},
            "reference": {"teacher_knn": {"sup": 80.0}, "random": {"knn_top1": 20.0}}}


def _dense_row(method: str, student: str, teacher: str, knn: float, miou: float, status: str = "done") -> dict:
    return {"method": method, "student": student, "teacher": teacher, "budget": 30000, "knn_top1": knn,
            "linear_top1": knn + 2, "kind": "distill", "status": status, "dense": {"miou": miou}}


def _dense() -> dict:
    """quality_dense.json's shape: a CNN cell under the main protocol, a ViT cell with the suite's ViT teacher, a
    control of a main-table method and a cell that failed."""
    return {"config": {"cnn_student": "mobilenetv2_100", "vit_student": VIT, "vit_teacher": "mae:vit_small:50000"},
            "rows": {"p": _dense_row("pcd", "mobilenetv2_100", "sup", 35.95, 14.9),
                     "a": _dense_row("attndistill", VIT, "vit", 25.25, 12.0),
                     "c": _dense_row("compress-1q", "mobilenetv2_100", "sup", 34.25, 12.3),
                     "x": _dense_row("dense-reg", "mobilenetv2_100", "sup", 0.0, 0.0, status="failed")},
            "reference": {"teacher": {"knn_top1": 86.0}, "vit_teacher": {"knn_top1": 22.8},
                          "random:mobilenetv2_100": {"knn_top1": 22.5}, f"random:{VIT}": {"knn_top1": 28.2}}}


def test_render_packages_the_dense_suite_beside_the_main_table():
    import render

    q = _quality()
    data = render.measured_data(q, render.quality_facts(q), _dense())
    pcd = data["methods"]["pcd"]
    assert pcd["cells"] == [] and pcd["kind"] == "distill"  # not ranked with the main table
    assert pcd["dense_suite"] == [{"images_seen": 30000, "knn_top1": 35.95, "linear_top1": 37.95, "dense_miou": 14.9,
                                   "student": "mobilenetv2_100", "teacher": "ResNet-18 sup.", "kind": "distill",
                                   "same_protocol": True, "random_init_knn_top1": 22.5, "teacher_knn_top1": 86.0}]
    attn = data["methods"]["attndistill"]["dense_suite"][0]
    assert attn["same_protocol"] is False and attn["student"] == VIT and attn["teacher"] == "ViT teacher (mae)"
    # its own floor and ceiling: the ViT student at random init and the ViT teacher, not the main table's
    assert (attn["random_init_knn_top1"], attn["teacher_knn_top1"]) == (28.2, 22.8)
    assert "dense-reg" not in data["methods"]  # a failed cell measured nothing
    compress = data["methods"]["compress-1q"]
    assert [c["knn_top1"] for c in compress["cells"]] == [40.0] and compress["cells"][0]["rank"] == 1
    assert [c["knn_top1"] for c in compress["dense_suite"]] == [34.25]
    assert render.measured_data(q, render.quality_facts(q))["methods"].keys() == {"compress-1q"}  # no dense results


def test_methods_list_column_shows_dense_suite_cells_marked_as_such():
    import render

    from distillctl.methods import measured

    q = _quality()
    data = json.loads(json.dumps(render.measured_data(q, render.quality_facts(q), _dense())))
    assert measured.summary(data, "pcd") == "30k 36.0 (dense suite)"
    assert measured.summary(data, "attndistill") == f"30k 25.2 (dense suite, {VIT} student, ViT teacher (mae))"
    assert measured.summary(data, "compress-1q") == "30k #1/1 40.0"  # the main table wins where it measured
    assert measured.summary(data, "dense-reg") == "–"
    assert [c["knn_top1"] for c in measured.dense_suite_cells(data, "pcd")] == [35.95]


def test_methods_show_puts_a_dense_suite_cell_beside_its_floor_its_teacher_and_its_controls():
    """A method only the dense suite measured (attndistill) is shown against its own random-init student, the
    teacher it learnt from and the other methods distilled from that teacher into that student (the control that
    tells a weak method from a weak teacher); cells from other teachers or students are no control."""
    import render

    from distillctl.methods import measured

    q = _quality()
    dense = _dense()
    dense["rows"]["k"] = _dense_row("compress-1q", VIT, "vit", 23.7, 12.5)  # the control: same teacher, student
    dense["rows"]["o"] = _dense_row("mae-lite", VIT, "sup", 35.0, 13.0)  # another teacher: not a control
    data = json.loads(json.dumps(render.measured_data(q, render.quality_facts(q), dense)))
    assert measured.dense_context(data, "attndistill") == [
        "30k 25.2: random-init student 28.2; its teacher 22.8; same teacher and student: compress-1q 23.7"]
    assert measured.dense_context(data, "compress-1q") == []  # the main table measured it
    assert measured.dense_context(data, "pcd") == [
        "30k 36.0: random-init student 22.5; its teacher 86.0; same teacher and student: compress-1q 34.2"]
    dense["rows"]["c"]["budget"] = 120000  # another budget is no control either
    data = json.loads(json.dumps(render.measured_data(q, render.quality_facts(q), dense)))
    assert measured.dense_context(data, "pcd") == ["30k 36.0: random-init student 22.5; its teacher 86.0"]


def test_cli_lists_the_shipped_dense_suite_numbers():
    """The shipped measured.json (render.py's output for benchmarks/results) reaches `methods list`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    listed = subprocess.run([sys.executable, "-m", "distillctl", "methods", "list", "--json"], capture_output=True,
                            text=True, cwd=REPO, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)["methods"]}
    shipped = json.loads((REPO / "distillctl" / "methods" / "measured.json").read_text())["methods"]
    for name in ("pcd", "dense-reg", "attndistill", "mae-lite"):
        # table cells (dense-reg also ran in the main table at 120,000) and the dense suite's, each as shipped
        assert rows[name]["measured"] == shipped[name]["cells"]
        assert rows[name]["measured_dense_suite"] == shipped[name]["dense_suite"] != []
    assert shipped["attndistill"]["cells"] == []  # a ViT-student method: only the dense suite measured it
    table = subprocess.run([sys.executable, "-m", "distillctl", "methods", "list"], capture_output=True, text=True,
                           cwd=REPO, env=env, timeout=120)
    line = next(text for text in (table.stdout + table.stderr).splitlines() if text.startswith("│ attndistill "))
    knn = shipped["attndistill"]["dense_suite"][0]["knn_top1"]
    assert f"30k {knn:.1f} (dense suite, " in line  # with the ViT student and teacher it ran with


def test_cli_show_puts_the_shipped_vit_cells_beside_their_floor_and_teacher():
    """`methods show attndistill` prints, from the shipped measured.json, each ViT cell next to the random-init ViT
    student, its teacher and the control distilled from the same teacher (why the method is below random init)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    shown = subprocess.run([sys.executable, "-m", "distillctl", "methods", "show", "attndistill"], capture_output=True,
                           text=True, cwd=REPO, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    shipped = json.loads((REPO / "distillctl" / "methods" / "measured.json").read_text())["methods"]
    for cell in shipped["attndistill"]["dense_suite"]:
        assert (f"{cell['knn_top1']:.1f}: random-init student {cell['random_init_knn_top1']:.1f}; its teacher "
                f"{cell['teacher_knn_top1']:.1f}; same teacher and student:") in shown.stdout + shown.stderr
