"""Embedding geometry of finished quality-table students (issue 16 §2: why a method ends below random-init).

For each finished cell of the quality table at one budget (default 120,000 images) and for the teacher, on the
first ``--images`` test images (centre view, the run's own preprocessing):

- ``pair_cos``: mean cosine between the embeddings of *different* images (1.0: every image maps to one direction,
  the collapse distillctl's collapse watch reports; healthy students sit well below);
- ``nn1``: leave-one-out 1-nearest-neighbour label accuracy among those images (how much class structure the
  embedding keeps; cheaper and blunter than the table's kNN over the 10k bank);
- for the student's method head, where the run saved it as one linear map (``head.weight``/``head.bias`` in
  ``student/heads.safetensors``: smd, cosine-reg, mse-reg, …) the same two numbers on its output, plus
  ``cos_to_teacher`` (mean cos(head(S(x)), T(x)), the regression target) and ``cos_to_teacher_mean`` (mean
  cos(head(S(x)), mean_x T(x)): near 1 when the student predicts the teacher's average direction for every image).

The teacher row gives the reference: its own ``pair_cos``, ``nn1`` and the cosine of its features to their mean
direction (what a student that outputs only that direction scores as ``cos_to_teacher``).

Reads the finished runs in benchmarks/work/quality (made by quality.py); writes results/geometry.json. Needs
../shared (the teacher). Example: python benchmarks/geometry.py --budget 120000 --methods smd,cosine-reg,mse-reg
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from common import (RESULTS, TEACHER, WORK, BenchError, log, machine_info, require_shared, run_script,  # noqa: E402
                    subset_path, teacher_preprocess, write_json)


def pair_cos(embeddings) -> float:
    """Mean cosine similarity over the ordered pairs of different rows of an (N, D) tensor."""
    import torch.nn.functional as F

    rows = F.normalize(embeddings.double(), dim=1)
    total = rows.sum(dim=0)
    n = rows.shape[0]
    return float((total.dot(total) - (rows * rows).sum()) / (n * (n - 1)))


def nn1_accuracy(embeddings, labels) -> float:
    """Leave-one-out 1-NN (cosine) label accuracy, in percent."""
    import torch
    import torch.nn.functional as F

    rows = F.normalize(embeddings.double(), dim=1)
    similarity = rows @ rows.T
    similarity.fill_diagonal_(-float("inf"))
    nearest = similarity.argmax(dim=1)
    return float((labels[nearest] == labels).to(torch.float64).mean() * 100)


def cos_to_mean_direction(embeddings, reference) -> float:
    """Mean cosine of the rows of ``embeddings`` to the mean direction of the (normalised) rows of ``reference``."""
    import torch.nn.functional as F

    mean_direction = F.normalize(F.normalize(reference.double(), dim=1).mean(dim=0, keepdim=True), dim=1)
    return float((F.normalize(embeddings.double(), dim=1) @ mean_direction.T).mean())


def head_geometry(student_out, teacher_out, labels) -> dict:
    """The head-output numbers against the teacher's features (see the module docstring)."""
    import torch.nn.functional as F

    s, t = F.normalize(student_out.double(), dim=1), F.normalize(teacher_out.double(), dim=1)
    return {"pair_cos": pair_cos(student_out), "nn1": nn1_accuracy(student_out, labels),
            "cos_to_teacher": float((s * t).sum(dim=1).mean()),
            "cos_to_teacher_mean": cos_to_mean_direction(student_out, teacher_out)}


def _cells(budget: int, methods: list[str] | None) -> list[dict]:
    """Finished distillation cells of the main quality table (render.table_quality: the files it merges) at
    ``budget``."""
    import render

    rows = ((render.table_quality(RESULTS) or {}).get("rows") or {}).values()
    cells = [row for row in rows if row.get("status") == "done" and row.get("kind") == "distill"
             and row.get("teacher") == "sup" and row.get("budget") == budget
             and (methods is None or row["method"] in methods)]
    return sorted(cells, key=lambda row: row["method"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=120000, help="Images seen of the cells to measure.")
    parser.add_argument("--methods", default=None, help="Comma-separated methods (default: every finished cell).")
    parser.add_argument("--images", type=int, default=1000, help="Test images measured (every other of test2k).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--out", default=str(RESULTS / "geometry.json"), help="Result JSON.")
    args = parser.parse_args()
    require_shared()
    import torch
    from safetensors.torch import load_file

    from distillctl.data.datasets import open_dataset
    from distillctl.methods.collapse import COLLAPSE_COSINE
    from distillctl.eval.features import embed_dataset
    from distillctl.students import load_student
    from distillctl.teachers.resolve import load_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    test = subset_path("test2k")
    if not test.is_dir():
        raise BenchError(f"{test} is missing: run `python benchmarks/setup_data.py` (and the quality table) first")
    cells = _cells(args.budget, args.methods.split(",") if args.methods else None)
    if not cells:
        raise BenchError(f"no finished quality-table cell at {args.budget:,} images: run benchmarks/quality.py first")
    dataset = open_dataset(test)
    keep = list(range(0, len(dataset), max(1, len(dataset) // args.images)))[: args.images]
    subset = dataset.subset(keep)
    pre = teacher_preprocess()
    common = dict(input_size=64, mean=pre["mean"], std=pre["std"], crop_pct=1.0, batch_size=250)
    started = time.monotonic()
    teacher = load_teacher(str(TEACHER), pre["arch"])
    teacher_out, labels = embed_dataset(teacher.backbone, subset, **common)
    result = {"benchmark": "geometry", "command": "python benchmarks/geometry.py " + " ".join(sys.argv[1:]),
              "machine": machine_info(), "budget": args.budget, "images": len(keep),
              "collapse_threshold": COLLAPSE_COSINE,
              "teacher": {"pair_cos": pair_cos(teacher_out), "nn1": nn1_accuracy(teacher_out, labels),
                          "cos_to_own_mean": cos_to_mean_direction(teacher_out, teacher_out)},
              "rows": {}}
    for cell in cells:
        run = WORK / "quality" / cell["id"]
        if not (run / "student").is_dir():
            log(f"{cell['id']}: no student folder in {run}; skipped")
            continue
        model, config = load_student(run)
        backbone, _ = embed_dataset(model, subset, **{**common, "mean": config.mean, "std": config.std})
        row = {"method": cell["method"], "knn_top1": cell.get("knn_top1"),
               "backbone": {"pair_cos": pair_cos(backbone), "nn1": nn1_accuracy(backbone, labels)}, "head": None}
        heads_file = run / "student" / "heads.safetensors"
        heads = load_file(str(heads_file)) if heads_file.is_file() else {}
        if set(heads) == {"head.weight", "head.bias"} and heads["head.weight"].shape[0] == teacher_out.shape[1]:
            out = backbone @ heads["head.weight"].float().T + heads["head.bias"].float()
            row["head"] = head_geometry(out, teacher_out, labels)
        result["rows"][cell["id"]] = row
        log(f"{cell['id']}: backbone pair_cos {row['backbone']['pair_cos']:.3f}, 1-NN {row['backbone']['nn1']:.1f} %"
            + (f"; head pair_cos {row['head']['pair_cos']:.3f}, cos to the teacher {row['head']['cos_to_teacher']:.3f}"
               f" (to its mean direction {row['head']['cos_to_teacher_mean']:.3f})" if row["head"] else ""))
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    write_json(Path(args.out), result)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_script(main)
