"""The results table of a protocol run (:mod:`distillctl.protocol`): ``results.json`` and ``results.md``.

Every number is read from what the runs recorded (each cell's ``summary.json`` under ``protocol``, each
``floors/<arch>.json``); nothing is recomputed here, so the table always says what the runs measured.
"""

from __future__ import annotations

import json
from typing import Any

from distillctl._infra import atomic_write_json, atomic_write_text
from distillctl.protocol import Cell, Plan, cell_finished, floor_path


def inputs_record(plan_: Plan) -> dict:
    inputs = plan_.inputs
    return {"data": inputs.data, "data_sha256": plan_.data_sha256, "data_images": plan_.dataset_size,
            "eval_train": inputs.eval_train, "eval_val": inputs.eval_val,
            "eval_train_sha256": plan_.splits.train.manifest_hash(), "eval_val_sha256": plan_.splits.test.manifest_hash(),
            "budget_images": inputs.budget_images or plan_.spec.budget.images, "image_size": plan_.image_size,
            "methods": list(dict.fromkeys(cell.method for cell in plan_.cells)), "archs": plan_.archs}


def _row(plan_: Plan, cell: Cell) -> dict:
    """One cell's numbers as its run recorded them (summary.json); ``status`` says when there are none yet."""
    run_dir = plan_.run_dir(cell)
    row: dict[str, Any] = {"method": cell.method, "arch": cell.arch, "run_dir": str(run_dir)}
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    evaluation = (summary.get("protocol") or {}).get("eval")
    if not cell_finished(plan_, cell) or not evaluation:
        return {**row, "status": "not run"}
    train = summary.get("train") or {}
    return {**row, "status": "done", "knn_top1": evaluation["knn_top1"], "knn": evaluation["knn"],
            "linear_top1": evaluation["linear_top1"], "images_seen": train.get("images_seen"),
            "train_wall_s": train.get("total_wall_s") or train.get("wall_s"),
            "params": (summary.get("student") or {}).get("params"),
            "student_sha256": (summary.get("student") or {}).get("sha256")}


def write_results(plan_: Plan) -> dict:
    """results.json and results.md from the cells' summaries and the floor files (no number recomputed)."""
    floors = {}
    for arch in plan_.archs:
        path = floor_path(plan_, arch)
        if path.is_file():
            evaluation = json.loads(path.read_text())["eval"]
            floors[arch] = {"knn_top1": evaluation["knn_top1"], "knn": evaluation["knn"],
                            "linear_top1": evaluation["linear_top1"]}
    rows = [_row(plan_, cell) for cell in plan_.cells]
    spec = plan_.spec
    results = {"protocol": spec.name, "title": spec.title, "source": spec.source, "assumptions": spec.assumptions,
               "inputs": inputs_record(plan_), "eval": spec.eval.model_dump(mode="json"), "floors": floors,
               "rows": rows, "complete": all(row["status"] == "done" for row in rows)}
    out = plan_.inputs.out
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", render_markdown(results))
    return results


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def render_markdown(results: dict) -> str:
    """Two method × architecture tables (kNN, linear) with the random-init floor as the first column."""
    rows = results["rows"]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    archs = list(dict.fromkeys(row["arch"] for row in rows))
    by_cell = {(row["method"], row["arch"]): row for row in rows}
    inputs, evaluation = results["inputs"], results["eval"]
    lines = [f"# {results['title']}", "", f"Protocol `{results['protocol']}` ({results['source']}): pre-trained on "
             f"`{inputs['data']}` ({inputs['data_images']:,} images), {inputs['budget_images']:,} images seen per cell "
             f"at {inputs['image_size']} px; evaluated on `{inputs['eval_train']}` → `{inputs['eval_val']}`.", ""]
    for metric, title in (("knn_top1", f"kNN top-1 % (k={evaluation['knn_k'][0]}, T={evaluation['knn_temperature']})"),
                          ("linear_top1", f"linear probe top-1 % ({evaluation['linear_epochs']} epochs)")):
        lines += [f"## {title}", "", "| arch | random init | " + " | ".join(methods) + " |",
                  "|---|---:|" + "---:|" * len(methods)]
        for arch in archs:
            floor = results["floors"].get(arch, {}).get(metric)
            cells = [_number(by_cell[(method, arch)].get(metric)) for method in methods]
            lines.append(f"| {arch} | {_number(floor)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Assumptions (values the paper does not give):", ""] + [f"- {text}" for text in results["assumptions"]]
    if not results["complete"]:
        missing = [f"{row['method']} × {row['arch']}" for row in rows if row["status"] != "done"]
        lines += ["", f"Not run yet: {', '.join(missing)} (rerun the same command to continue)."]
    return "\n".join(lines) + "\n"
