"""Quality benchmark: kNN / linear top-1 of the same student after the same budget, for every registered
distillation method, the SSL-only baselines, the teacher and a randomly initialised student.

Every cell is one real ``distillctl run`` (or ``distillctl pretrain`` for SSL-only students) on the
CIFAR-10 subsets in benchmarks/work (10 000 train images, 1 000 per class; 2 000 test images, 200 per
class; 32 px JPEGs upsampled to 64 px, crop_pct 1.0). Budget = images seen (train.max_steps × batch);
the cosine schedule spans the same budget (train.epochs = budget / 10 000, rounded up). The supervised
ResNet-18 teacher in ../shared/teachers is a local teacher; ``--ssl-teacher`` also trains a teacher with
``distillctl pretrain`` and distils from it. Cached teacher where the method allows (teacher mode auto);
one feature cache per (teacher, view spec, outputs), shared by the methods that ask for the same one.

Resumable: a cell whose summary.json records the requested budget and an eval result is skipped; an
interrupted cell resumes from its checkpoint (the pipeline's own stage fingerprints).
Writes benchmarks/results/quality.json after every cell.

Example: python benchmarks/quality.py --budget-images 120000 --curve
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's distillctl (random students, specs)

from common import (RESULTS, TEACHER, WORK, BenchError, arch_parts, arch_tag, default_threads,  # noqa: E402
                    display_command, distillctl, log, machine_info, protocol_subset, random_student, read_json, rel,
                    registered_methods, require_shared, run_script, split_specs, standard_data, student_sets,
                    subset_path, teacher_preprocess, write_json)


# Guards ``result``: cell workers record rows and the heartbeat thread writes it (a dict changing size while
# json.dump iterates it would kill the heartbeat). Re-entrant: workers call save() while holding it.
RESULT_LOCK = threading.RLock()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: python benchmarks/quality.py --budget-images 120000 --curve\n"
                                            "Smoke:   python benchmarks/quality.py --quick",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-images", type=int, default=None,
                        help="Images seen per cell (default 120000; --suite dense: 30000; --quick: 256).")
    parser.add_argument("--extra", action="append", default=[], metavar="METHOD=IMAGES",
                        help="An extra cell for METHOD at another budget (repeatable; any registered method, also one left "
                             "out of --methods), e.g. --extra simreg=30000.")
    parser.add_argument("--batch-size", type=int, default=None, help="Global batch for every cell (default 64; --quick: 32).")
    parser.add_argument("--methods", default="all",
                        help="Comma-separated distillation methods, 'all' (every registered one) or 'none'.")
    parser.add_argument("--ssl-methods", default="all", help="SSL-only baselines: comma-separated, 'all' or 'none'.")
    parser.add_argument("--students", default="mobilenetv2_100",
                        help="Comma-separated timm students (e.g. mobilenetv2_100,mobilenetv3_small_100).")
    parser.add_argument("--image-size", type=int, default=None, help="Input resolution (default 64; --quick: 32).")
    parser.add_argument("--cache-views", type=int, default=None,
                        help="Stored views per image in the feature cache (default 4; --quick: 2).")
    parser.add_argument("--seed", type=int, default=0, help="Run seed of every cell.")
    parser.add_argument("--no-linear", action="store_true", help="Skip the linear probe (kNN only).")
    parser.add_argument("--ssl-teacher", default="none", metavar="METHOD:ARCH:IMAGES",
                        help="Also pretrain an SSL teacher, e.g. mocov2:resnet18:60000 ('none' to skip).")
    parser.add_argument("--ssl-teacher-methods", default="simreg,seed",
                        help="Methods distilled from the SSL teacher (default simreg,seed).")
    parser.add_argument("--ssl-teacher-mode", default="auto", choices=("auto", "online", "cached"),
                        help="Teacher mode of the cells distilled from the SSL teacher (online: no cache build).")
    parser.add_argument("--online", default="", metavar="METHODS",
                        help="Methods run with the teacher online instead of auto (cheaper than building a cache "
                             "for budgets under one epoch).")
    parser.add_argument("--curve", action="store_true", help="Then run the best --curve-top methods at --curve-budgets.")
    parser.add_argument("--curve-top", type=int, default=3, help="How many methods get a curve (default 3).")
    parser.add_argument("--curve-budgets", default="30000,120000,250000,500000", help="Images seen per curve point.")
    parser.add_argument("--quick", action="store_true",
                        help="Tiny smoke configuration: 32 px, 1k/500-image subsets, 256 images, simreg + mocov2 (--suite "
                             "dense: 2-block ViTs, a 256-image ViT teacher, 64/32 mosaics); flags given explicitly win.")
    parser.add_argument("--first", default="simreg,compress-1q,mocov2,seed",
                        help="Methods run first within a budget, in this order (the reference distiller first, "
                             "then the SSL-only baseline the gains are measured against).")
    parser.add_argument("--no-channels-last", action="store_true",
                        help="Train in NCHW (default: train.channels_last=true, ~1.3x faster on CPU).")
    parser.add_argument("--jobs", type=int, default=1,
                        help="Cells run in parallel (cells sharing a cache run in order); threads = cores / jobs.")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/torch threads of every distillctl process (default: cores / jobs).")
    parser.add_argument("--collect", action="store_true",
                        help="Run nothing: record the cells (and reference evaluations) that already finished.")
    parser.add_argument("--dry-run", action="store_true",
                        help="Print the cells and their commands; run, unpack, build and write nothing.")
    parser.add_argument("--preset", default="auto", choices=("auto", "published"),
                        help="method.preset of every cell (auto: values sized for the protocol; published: the "
                             "papers' values; default auto).")
    parser.add_argument("--out", default=None, help="Result JSON (default results/quality.json, quality_quick.json; "
                                                    "--suite dense: quality_dense.json, quality_dense_quick.json).")
    dense = parser.add_argument_group("dense features (issue 14)", DENSE_HELP)
    dense.add_argument("--suite", default="table", choices=("table", "dense"),
                       help="table: every registered method on one student (default); dense: the ViT and dense-"
                            "distillation cells, each with kNN, linear and the dense probe.")
    dense.add_argument("--dense", action="store_true",
                       help="Also run the dense probe (distillctl eval dense) on every cell (implied by --suite dense).")
    dense.add_argument("--dense-mosaics", type=int, default=None, help="Train mosaics of the dense probe (default 1000).")
    dense.add_argument("--dense-val-mosaics", type=int, default=None, help="Evaluation mosaics (default 500).")
    dense.add_argument("--dense-epochs", type=int, default=None, help="SGD epochs of the dense probe (default 20).")
    dense.add_argument("--vit-student", default=None, metavar="ARCH",
                       help=f"ViT student of the dense suite (default {DENSE_DEFAULTS['vit_student']}).")
    dense.add_argument("--vit-teacher", default=None, metavar="METHOD:ARCH:IMAGES",
                       help=f"ViT teacher pretrained by the dense suite (default {DENSE_DEFAULTS['vit_teacher']}).")
    dense.add_argument("--vit-global-method", default="compress-1q",
                       help="Method distilling the CNN teacher into the ViT student (default compress-1q; 'none' to skip).")
    dense.add_argument("--vit-teacher-methods", default="attndistill,mae-lite",
                       help="Methods distilled from the ViT teacher into the ViT student (default attndistill,mae-lite; "
                            "'none' to skip).")
    dense.add_argument("--dense-methods", default="pcd,dense-reg",
                       help="Dense methods on the CNN student (default pcd,dense-reg; 'none' to skip).")
    dense.add_argument("--reference-method", default="compress-1q",
                       help="The best global method on the CNN student, dense-probed beside them (its table cell is "
                            "reused when finished; default compress-1q; 'none' to skip).")
    dense.add_argument("--vit-lr", type=float, default=1e-3,
                       help="AdamW lr of the ViT cells and of the ViT teacher (default 0.001; weight decay 0.05).")
    return resolve_defaults(parser.parse_args(argv))


# --- the dense suite's defaults and description ----------------------------------------------------

DENSE_HELP = ("The dense probe is `distillctl eval dense` (task mosaic-2x2): four centre views of the test/train images "
              "tiled 2x2, every pixel labelled with its quadrant's class, a 1x1 linear classifier on the frozen last-stage "
              "map trained on the train mosaics, mIoU and pixel accuracy on the test mosaics.")
DENSE_DEFAULTS = {"vit_student": "vit_tiny_patch16_224(patch_size=8)",
                  "vit_teacher": "mae:vit_small_patch16_224(patch_size=8):50000",
                  "dense_mosaics": 1000, "dense_val_mosaics": 500, "dense_epochs": 20}
QUICK_DENSE = {"vit_student": "vit_tiny_patch16_224(patch_size=8, depth=1)",
               "vit_teacher": "mae:vit_tiny_patch16_224(patch_size=8, depth=2, num_heads=6):256",
               "dense_mosaics": 64, "dense_val_mosaics": 32, "dense_epochs": 3}
# the ViT cells train with AdamW (the ViT recipes' optimizer; SGD at the CNN lr does not train them)
VIT_TRAIN_SETS = ("train.optimizer=adamw", "train.weight_decay=0.05")


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset: --quick's smoke values or the full run's, per suite (explicit flags win)."""
    quick = {"budget_images": 256, "batch_size": 32, "image_size": 32, "cache_views": 2, **QUICK_DENSE}
    full = {"budget_images": 30_000 if args.suite == "dense" else 120_000, "batch_size": 64, "image_size": 64,
            "cache_views": 4, **DENSE_DEFAULTS}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dense = args.dense or args.suite == "dense"
    return args


# --- cells ---------------------------------------------------------------------------------------

def _pick(requested: str, available: list[str]) -> list[str]:
    if requested == "all":
        return list(available)
    if requested == "none":
        return []
    names = [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(available)}")
    return names


def _budgets(args: argparse.Namespace) -> dict[str, list[int]]:
    budgets = {}
    for item in args.extra:
        name, _, value = item.partition("=")
        budgets.setdefault(name.strip(), []).append(int(value))
    return budgets


def plan_cells(args: argparse.Namespace, methods: list[dict]) -> list[dict]:
    """The cells to run, cheapest budgets first (so the full table fills before long runs start)."""
    # multi-teacher methods (simreg-multi) need a second teacher: not part of this one-teacher table
    distill_all = [m["name"] for m in methods if m["kind"] == "distill" and m.get("teachers") != "2+"
                   and not m["teacher_mode"].startswith("?")]
    ssl_all = [m["name"] for m in methods if m["kind"] == "ssl"]
    distill = _pick(args.methods, distill_all)
    ssl = _pick(args.ssl_methods, ssl_all)
    overrides = _budgets(args)
    unknown = sorted(set(overrides) - set(distill_all) - set(ssl_all))
    if unknown:
        raise BenchError(f"--extra names unknown method(s) {', '.join(unknown)}")
    cells = []
    for student in split_specs(args.students):
        # --extra cells exist for any registered method, also one left out of --methods / --ssl-methods
        for name in distill_all:
            main = [args.budget_images] if name in distill else []
            for budget in main + overrides.get(name, []):
                cells.append({"kind": "distill", "method": name, "teacher": "sup", "student": student, "budget": budget})
        for name in ssl_all:
            main = [args.budget_images] if name in ssl else []
            for budget in main + overrides.get(name, []):
                cells.append({"kind": "ssl", "method": name, "teacher": None, "student": student, "budget": budget})
        if args.ssl_teacher != "none":
            for name in _pick(args.ssl_teacher_methods, distill_all):
                cells.append({"kind": "distill", "method": name, "teacher": "ssl", "student": student,
                              "budget": args.budget_images})
    # cheapest budgets first; within a budget the --first methods (in that order, distillation or SSL) before the
    # rest, and among the rest distillation before SSL
    for cell in cells:
        cell["preset"] = args.preset
    first = [n.strip() for n in args.first.split(",") if n.strip()]
    return sorted(cells, key=lambda c: (c["budget"], first.index(c["method"]) if c["method"] in first else len(first),
                                        c["kind"] == "ssl"))


def cell_id(cell: dict) -> str:
    """``student/teacher/method-budget[-preset]``: cells run with ``--preset`` carry it, so they never reuse (or
    overwrite) a cell of another preset; cells from before method.preset have no suffix."""
    suffix = f"-{cell['preset']}" if cell.get("preset") else ""
    teacher = cell.get("teacher_tag") or cell["teacher"] or "none"  # teacher_tag: which pretrained teacher
    return f"{arch_tag(cell['student'])}/{teacher}/{cell['method']}-{cell['budget']}{suffix}"


def cell_dir(cell: dict) -> Path:
    """The run directory of a cell (``dir`` when the cell names its own: teachers, reused table cells)."""
    return Path(cell["dir"]) if cell.get("dir") else WORK / "quality" / cell_id(cell)


def schedule(budget: int, batch: int, train_images: int) -> tuple[int, int]:
    """(max_steps, epochs): the budget in optimizer steps; the LR schedule spans the same budget."""
    steps = max(1, budget // batch)
    steps_per_epoch = max(1, train_images // batch)
    return steps, max(1, math.ceil(steps / steps_per_epoch))


@functools.lru_cache(maxsize=None)
def _student_dim(student: str) -> int:
    """Embedding width of a student spec (``name`` or ``name(key=value, …)``)."""
    import timm

    name, kwargs = arch_parts(student)
    return int(timm.create_model(name, pretrained=False, num_classes=0, **kwargs).num_features)


def method_params_set(cell: dict) -> dict:
    """The ``method.params.*`` values a cell sets with ``--set`` (a sweep variant's), parsed as the CLI does."""
    from distillctl.config import parse_set

    return {key[len("method.params."):]: value for key, value in parse_set(cell.get("sets") or ()).items()
            if key.startswith("method.params.")}


def cache_dir_for(method: str, teacher_key: str, teacher_dims, student: str, args: argparse.Namespace,
                  params: dict | None = None) -> Path:
    """One feature cache per (teacher, stored-view spec, outputs, K): methods asking for the same share it.

    ``params`` are the cell's own method params: a setting that changes the stored view (e.g. smd's
    ``augmentation``) gets the cache of that view instead of failing on the default view's cache."""
    from distillctl.data.views import spec_dict
    from distillctl.methods.base import build_method

    student_dim = _student_dim(student)
    requirements = build_method(method, dict(params or {}), student_dim, teacher_dims).requirements(args.image_size)
    # the spec the pipeline stores in the cache (distillctl/pipeline.py): the first teacher view, else the first view
    teacher_views = [view.spec for view in requirements.views if view.teacher] or [requirements.views[0].spec]
    key = {"teacher": teacher_key, "spec": spec_dict(teacher_views[0]),
           "outputs": sorted(requirements.teacher_outputs), "views": args.cache_views, "seed": args.seed,
           "size": args.image_size}
    if requirements.teacher_taps:  # a cache with the teacher's maps (pcd, dense-reg); others keep their directory
        key["taps"] = sorted(requirements.teacher_taps)
    turns = 1 + max(spec.quarter_turns for spec in teacher_views)
    if turns > 1:  # a cache with rotated copies (dlkd); others keep their directory
        key["turns"] = turns
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return WORK / "caches" / f"{teacher_key}-{digest}"


def common_sets(args: argparse.Namespace, cell: dict, steps: int, pre: dict, first: bool) -> list[str]:
    mean = ",".join(f"{v:g}" for v in pre["mean"])
    std = ",".join(f"{v:g}" for v in pre["std"])
    sets = [f"method.preset={getattr(args, 'preset', 'auto')}",
            f"train.max_steps={steps}", f"train.seed={args.seed}", "data.crop_pct=1.0", f"data.mean=[{mean}]",
            f"data.std=[{std}]", "export.enabled=false", f"eval.linear={'false' if args.no_linear else 'true'}",
            f"eval.teacher={'true' if first else 'false'}", f"eval.random_student={'true' if first else 'false'}",
            "train.log_every=10", "train.checkpoint_every_minutes=5"]
    if not getattr(args, "no_channels_last", False):
        sets.append("train.channels_last=true")
    sets += list(cell.get("sets") or ())  # the cell's own keys (the ViT cells' optimizer)
    return [item for s in sets for item in ("--set", s)] + student_sets(cell["student"]) + \
        (["--lr", f"{cell['lr']:g}"] if cell.get("lr") else [])


def cell_command(cell: dict, args: argparse.Namespace, data: dict, pre: dict, teachers: dict, first: bool) -> list[str]:
    steps, epochs = schedule(cell["budget"], args.batch_size, data["train_images"])
    out = str(cell_dir(cell))
    sets = common_sets(args, cell, steps, pre, first)
    if cell["kind"] == "ssl":
        return ["pretrain", "--method", cell["method"], "--arch", arch_parts(cell["student"])[0], "--data", str(data["train"]),
                "--val-data", str(data["test"]), "--image-size", str(args.image_size), "--epochs", str(epochs),
                "--batch-size", str(args.batch_size), "--out", out, *sets]
    teacher = teachers[cell["teacher"]]
    command = ["run", "--method", cell["method"], "--teacher", teacher["path"], "--teacher-arch", teacher["arch"],
               "--student", arch_parts(cell["student"])[0], "--data", str(data["train"]), "--val-data", str(data["test"]),
               "--image-size", str(args.image_size), "--epochs", str(epochs), "--batch-size", str(args.batch_size),
               "--seed", str(args.seed), "--cache-views", str(args.cache_views), "--out", out, *sets]
    mode = teacher["modes"].get(cell["method"], "")
    forced = args.ssl_teacher_mode if cell["teacher"] == "ssl" else "auto"
    if cell["method"] in [m.strip() for m in args.online.split(",") if m.strip()]:
        forced = "online"
    if forced != "auto":
        command[command.index("--out"):command.index("--out")] = ["--teacher-mode", forced]
        mode = "" if forced == "online" else mode
    if mode.startswith("cached"):
        from distillctl.methods.base import TeacherDims

        dims = TeacherDims(teacher["dim"], None)
        command[command.index("--out"):command.index("--out")] = [
            "--cache", str(cache_dir_for(cell["method"], teacher.get("key", cell["teacher"]), dims, cell["student"], args,
                                         method_params_set(cell)))]
    return command


def finished(cell: dict, steps: int) -> dict | None:
    summary = read_json(cell_dir(cell) / "summary.json")
    if not summary or summary.get("recipe", {}).get("train", {}).get("max_steps") != steps:
        return None
    if cell.get("preset") and (summary.get("recipe", {}).get("method") or {}).get("preset") != cell["preset"]:
        return None
    if summary.get("student", {}).get("knn_top1") is None or summary.get("train", {}).get("steps") != steps:
        return None
    stale = stale_derivation(summary)
    if stale:
        log(f"cell {cell_id(cell)}: ran under an older preset derivation ({stale}); not reused")
        return None
    return summary


def stale_derivation(summary: dict) -> str | None:
    """What this checkout's preset policy derives differently for a finished run (``key: then → now``), or None
    (see :func:`stale_values`)."""
    return "; ".join(f"{key}: {ran} → {now}" for key, ran, now in stale_values(summary)) or None


def stale_values(summary: dict) -> list[tuple[str, Any, Any]]:
    """``(key, value the run used, value the same command uses now)`` for each preset-derived key that differs.

    A run records every value its ``method.preset`` derived (``recipe.derived``); a key set explicitly is never
    derived. Re-deriving for the run's own size (training images, batch, max_steps) with the same explicit keys
    tells whether the command would now run other settings: then the finished run is not what the command gives
    (e.g. a derivation added since), and reusing it would put a stale number under the command."""
    recipe = summary.get("recipe") or {}
    method, train = recipe.get("method") or {}, recipe.get("train") or {}
    recorded = {key: (entry or {}).get("value") for key, entry in (recipe.get("derived") or {}).items()}
    images = (summary.get("data") or {}).get("images")
    if not method.get("name") or not method.get("preset") or not images or not train.get("max_steps"):
        return []  # not a preset-era run: nothing to compare
    try:
        from distillctl.methods.base import get_method
        from distillctl.methods.presets import RunSize, derive, method_facts
        facts = method_facts(get_method(method["name"]))
    except Exception:  # noqa: BLE001 - a method no longer registered: the run stands as it ran
        return []
    batch = int(train.get("batch_size") or 1)
    size = RunSize(int(images), batch, int(train["max_steps"]) * batch, str(train.get("optimizer") or "sgd"))
    params = method.get("params") or {}
    explicit = ({f"method.params.{name}" for name in params} | {"train.lr"}) - set(recorded)
    now = {item.key: item.value for item in derive(facts, size, method["preset"], explicit)}

    def ran(key: str) -> Any:  # the value the run used
        name = key.removeprefix("method.params.")
        return train.get("lr") if key == "train.lr" else params.get(name, facts.defaults.get(name))

    def would_run(key: str) -> Any:  # the value the same command uses now
        if now.get(key) is not None:
            return now[key]
        if key == "train.lr":  # not derived (now): the command's own lr, as then unless then it was derived
            return ran(key) if recorded.get(key) is None else None
        # derived then, not now (an explicit key is in neither): the Params default
        return facts.defaults.get(key.removeprefix("method.params."))

    return [(key, ran(key), would_run(key)) for key in sorted(set(now) | set(recorded)) if ran(key) != would_run(key)]


def row_from_summary(cell: dict, summary: dict, command: list[str]) -> dict:
    # the eval switches as the cell actually ran (a resumed suite may have been started with other ones)
    ran = (summary.get("recipe") or {}).get("eval") or {}
    command = [next((f"eval.{key}={'true' if ran[key] else 'false'}" for key in ("linear", "teacher", "random_student")
                     if item.startswith(f"eval.{key}=") and key in ran), item) for item in command]
    train = summary.get("train") or {}
    student_eval = (summary.get("eval") or {}).get("student") or {}
    linear = student_eval.get("linear") or {}
    return {**cell, "id": cell_id(cell), "status": "done", "knn_top1": summary["student"].get("knn_top1"),
            "linear_top1": linear.get("top1"), "linear_setting": {k: linear.get(k) for k in ("lr", "weight_decay")},
            **train_time(train, cell_dir(cell) / "metrics.jsonl"), "images_per_sec": train.get("images_per_sec"),
            "steps": train.get("steps"), "images_seen": (train.get("steps") or 0) * args_batch(summary),
            "teacher_mode": train.get("teacher_mode"), "cell_wall_s": summary.get("wall_s"),
            "collapse": train.get("collapse"),
            # intra-op threads it trained with: float reductions, and so the trained weights, depend on it
            "threads": (train.get("threads") or {}).get("threads"),
            "lr": train.get("lr"), "preset": ((summary.get("recipe") or {}).get("method") or {}).get("preset"),
            "derived": (summary.get("recipe") or {}).get("derived"),
            "teacher_knn_top1": (summary.get("teacher") or {}).get("knn_top1"),
            "random_student_knn_top1": ((summary.get("eval") or {}).get("random_student") or {}).get("knn_top1"),
            "eval_protocol": (summary.get("eval") or {}).get("protocol"),
            "command": "distillctl " + display_command(command)}


def train_time(train: dict, metrics_path: Path) -> dict:
    """The cell's training time over every invocation (a resumed cell's ``wall_s`` is its last invocation only).

    ``total_wall_s`` comes from distillctl itself; for cells resumed from a checkpoint written before distillctl
    recorded it, the time is summed from metrics.jsonl: each logged window lasts (images in it) / img_per_s, the
    last record of each step wins (steps re-run after an interruption replace the lost ones)."""
    if train.get("total_wall_s") is not None or not train.get("resumed_from_step"):
        return {"train_wall_s": train.get("total_wall_s") or train.get("wall_s"), "train_wall_estimated": False}
    by_step: dict[int, dict] = {}
    try:
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line)
            if record.get("stage") in ("distill", "pretrain") and record.get("img_per_s"):
                by_step[int(record["step"])] = record
    except (OSError, ValueError):
        return {"train_wall_s": None, "train_wall_estimated": False}
    batch = int(train.get("global_batch") or 0)
    seconds, previous = 0.0, 0
    for step in sorted(by_step):
        seconds += (step - previous) * batch / by_step[step]["img_per_s"]
        previous = step
    return {"train_wall_s": round(seconds, 1) if by_step and batch else None, "train_wall_estimated": bool(by_step)}


def args_batch(summary: dict) -> int:
    return int(summary.get("recipe", {}).get("train", {}).get("batch_size") or 0)


# --- teachers and reference rows -------------------------------------------------------------------

def teacher_modes() -> dict[str, str]:
    return {m["name"]: m["teacher_mode"] for m in registered_methods()}


def split_teacher_spec(spec: str) -> tuple[str, str, int]:
    """``METHOD:ARCH:IMAGES`` → (method, arch spec, images); the arch may carry keywords (``vit_small_patch16_224(
    patch_size=8)``)."""
    method, _, rest = spec.partition(":")
    arch, _, images = rest.rpartition(":")
    if not method or not arch or not images.isdigit():
        raise BenchError(f"teacher spec '{spec}' is not METHOD:ARCH:IMAGES (e.g. mocov2:resnet18:60000)")
    return method, arch, int(images)


def ssl_teacher_dir(args, spec: str | None = None) -> Path:
    """Where ``--ssl-teacher`` (or another ``METHOD:ARCH:IMAGES`` spec) is pretrained (one folder per preset)."""
    method, arch, images = split_teacher_spec(spec or args.ssl_teacher)
    return WORK / "quality" / "ssl-teacher" / f"{method}-{arch_tag(arch)}-{images}-{args.preset}"


def teacher_cell(args, spec: str) -> dict:
    """The ``distillctl pretrain`` cell that makes a teacher; ViT teachers train with AdamW at ``--vit-lr``."""
    method, arch, images = split_teacher_spec(spec)
    cell = {"kind": "ssl-teacher", "method": method, "teacher": None, "student": arch, "budget": images,
            "preset": args.preset, "dir": str(ssl_teacher_dir(args, spec))}
    if is_vit(arch):
        cell.update(sets=list(VIT_TRAIN_SETS), lr=args.vit_lr)
    return cell


def is_vit(arch: str) -> bool:
    """A patch-based student or teacher (trained with the ViT settings)."""
    name = arch_parts(arch)[0]
    return any(name.startswith(prefix) for prefix in ("vit_", "deit", "eva", "test_vit"))


def teacher_entry(args, spec: str) -> dict:
    """How the distillation cells name a pretrained teacher: its file, ``--teacher-arch`` with the constructor
    keywords the pretrain run recorded (a ViT's img_size and patch_size), embedding width and cache key."""
    from distillctl.resolution import student_model_kwargs

    method, arch, images = split_teacher_spec(spec)
    name, extra = arch_parts(arch)
    kwargs = student_model_kwargs(name, args.image_size, extra=extra)
    arch_arg = name + (f"({', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items()))})" if kwargs else "")
    return {"path": str(ssl_teacher_dir(args, spec) / "student" / "model.safetensors"), "arch": arch_arg,
            "dim": _student_dim(arch), "key": f"ssl-{method}-{arch_tag(arch)}-{images}-{args.preset}"}


def teacher_command(args, data, pre, spec: str) -> tuple[dict, list[str], int]:
    cell = teacher_cell(args, spec)
    steps, epochs = schedule(cell["budget"], args.batch_size, data["train_images"])
    command = ["pretrain", "--method", cell["method"], "--arch", arch_parts(cell["student"])[0], "--data",
               str(data["train"]), "--val-data", str(data["test"]), "--image-size", str(args.image_size), "--epochs",
               str(epochs), "--batch-size", str(args.batch_size), "--out", cell["dir"],
               *common_sets(args, cell, steps, pre, first=False)]
    return cell, command, steps


def ssl_teacher(args, data, pre, log_path: Path, spec: str | None = None) -> dict:
    """Pretrain the SSL teacher with ``distillctl pretrain`` (resumable like any cell)."""
    spec = spec or args.ssl_teacher
    cell, command, steps = teacher_command(args, data, pre, spec)
    summary = read_json(Path(cell["dir"]) / "summary.json")
    done = summary and summary.get("train", {}).get("steps") == steps and summary["student"].get("knn_top1") is not None
    if not done and args.collect:
        raise BenchError(f"teacher {spec} not trained yet (--collect runs nothing)")
    if not done:
        log(f"teacher {spec}: distillctl {display_command(command)}")
        summary = distillctl(command, log_path, threads=args.threads)
    return {**teacher_entry(args, spec), "row": row_from_summary(cell, summary, command)}


def reference_rows(args, data, pre, log_path: Path, student: str) -> dict:
    """Teacher linear probe and a random-init student (kNN + linear) through ``distillctl eval``."""
    rows = {}
    common = ["--data", str(data["train"]), "--val-data", str(data["test"]), "--crop-pct", "1.0"]
    if not args.no_linear:
        out = WORK / "quality" / "reference" / "teacher-linear.json"
        result = read_json(out)
        if result is None and args.collect:
            return rows
        if result is None:
            command = ["eval", "linear", f"teacher:{TEACHER}", "--teacher-arch", pre["arch"], "--input-size",
                       str(args.image_size), "--cache-dir", str(WORK / "quality" / "reference" / "eval_cache"), *common]
            result = {"result": distillctl(command, log_path, threads=args.threads),
                      "command": "distillctl " + display_command(command)}
            write_json(out, result)
        rows["teacher_linear"] = {"linear_top1": result["result"]["linear"]["top1"], "command": result["command"],
                                  "protocol": result["result"].get("protocol")}
    random_dir = random_student(student, args.image_size, args.seed, pre)
    for kind in ("knn",) + (() if args.no_linear else ("linear",)):
        out = random_dir.parent / f"{random_dir.name}-{kind}.json"
        result = read_json(out)
        if result is None and args.collect:
            continue
        if result is None:
            command = ["eval", kind, str(random_dir), "--no-cache", *common]
            result = {"result": distillctl(command, log_path, threads=args.threads),
                      "command": "distillctl " + display_command(command)}
            write_json(out, result)
        value = result["result"].get(kind) or {}
        key = "knn_top1" if kind == "knn" else "linear_top1"
        rows.setdefault("random", {})[key] = value.get("top1") if kind == "linear" else _knn_top1(result["result"])
        rows["random"][f"{kind}_command"] = result["command"]
    return rows


def _knn_top1(result: dict):
    for key in ("knn_top1", "top1"):
        if key in result:
            return result[key]
    knn = result.get("knn")
    if isinstance(knn, dict):
        if "knn_top1" in knn:
            return knn["knn_top1"]
        values = [v for v in knn.values() if isinstance(v, (int, float))]
        return values[0] if values else None
    return None


# --- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_shared()
    started = time.time()
    if args.threads is None:
        args.threads = default_threads(args.jobs)
    make = not args.dry_run  # a dry run prints the commands: it unpacks, builds and writes nothing
    if args.quick:
        args.methods = "simreg" if args.methods == "all" else args.methods
        args.ssl_methods = "mocov2" if args.ssl_methods == "all" else args.ssl_methods
    data = suite_data(args, make)
    out = Path(args.out) if args.out else RESULTS / (f"{'quality_dense' if args.suite == 'dense' else 'quality'}"
                                                     f"{'_quick' if args.quick else ''}.json")
    pre = teacher_preprocess()
    methods = registered_methods()
    if args.suite == "dense":
        return dense_main(args, argv, data, pre, methods, out, started)
    modes = {m["name"]: m["teacher_mode"] for m in methods}
    teachers = {"sup": {"path": str(TEACHER), "arch": pre["arch"], "dim": 512, "modes": modes}}
    cells = plan_cells(args, methods)
    log_path = WORK / "quality" / ("quick.log" if args.quick else "suite.log")
    result, base_elapsed = start_result(args, argv, data, pre, methods, out)
    if args.dry_run:
        if args.ssl_teacher != "none":
            teachers["ssl"] = {**teacher_entry(args, args.ssl_teacher), "modes": modes}
        for i, cell in enumerate(cells):
            print("distillctl " + display_command(cell_command(cell, args, data, pre, teachers, i == 0)))
        return 0
    save = start_saving(result, out, base_elapsed, started)
    run_cells([c for c in cells if c["teacher"] != "ssl"], args, data, pre, teachers, result, log_path, save)
    try:
        reference = reference_rows(args, data, pre, log_path, cells[0]["student"] if cells else "mobilenetv2_100")
        with RESULT_LOCK:
            result["reference"].update(reference)
    except BenchError as exc:
        with RESULT_LOCK:
            result["reference"]["error"] = str(exc)
        log(f"reference rows failed: {exc}")
    save()
    if args.ssl_teacher != "none":  # after the main table: the SSL teacher is the most expensive single run
        try:
            teachers["ssl"] = ssl_teacher(args, data, pre, log_path)
            teachers["ssl"]["modes"] = modes
            with RESULT_LOCK:
                result["reference"]["ssl_teacher"] = teachers["ssl"]["row"]
            run_cells([c for c in cells if c["teacher"] == "ssl"], args, data, pre, teachers, result, log_path, save)
        except BenchError as exc:
            with RESULT_LOCK:
                result["reference"]["ssl_teacher_error"] = str(exc)
            log(f"SSL teacher failed: {exc}")
    if args.curve:
        run_curve(args, data, pre, teachers, result, log_path, save)
    save()
    log(f"quality suite done in {time.time() - started:.0f} s → {out}")
    return 0


def suite_data(args: argparse.Namespace, make: bool) -> dict:
    """The train/test subsets of the run (--quick: the 1k/500 ones), made unless ``make`` is false (a dry run)."""
    if not args.quick:
        return {**standard_data(make), "train_images": 10_000, "test_images": 2_000}
    subsets = {key: (protocol_subset(name) if make else subset_path(name))
               for key, name in (("train", "train1k"), ("test", "test500"))}
    return {"train": rel(subsets["train"]), "test": rel(subsets["test"]), "train_images": 1000, "test_images": 500}


def start_result(args, argv, data, pre, methods, out: Path) -> tuple[dict, float]:
    """The result document (rows and references of an earlier invocation kept) and the time already spent."""
    previous = read_json(out) or {}
    result = {"benchmark": "quality", "suite": args.suite, "argv": sys.argv[1:] if argv is None else argv,
              "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "config": {"budget_images": args.budget_images, "extra_budgets": _budgets(args),
                         "batch_size": args.batch_size, "image_size": args.image_size, "cache_views": args.cache_views,
                         "seed": args.seed, "students": args.students, "linear": not args.no_linear,
                         "train_images": data["train_images"], "test_images": data["test_images"],
                         "data": {"train": Path(data["train"]).name, "test": Path(data["test"]).name},
                         "teacher": {"file": TEACHER.name, **pre}, "ssl_teacher": args.ssl_teacher,
                         "registered_methods": methods},
              "machine": machine_info(), "started_utc": previous.get("started_utc") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "rows": dict(previous.get("rows") or {}), "reference": previous.get("reference", {}),
              "curve": previous.get("curve", {})}
    if args.dense:
        result["config"]["dense_probe"] = {"task": "mosaic-2x2", "mosaics": args.dense_mosaics,
                                           "val_mosaics": args.dense_val_mosaics, "epochs": args.dense_epochs}
    if args.collect and previous.get("command"):  # the command that ran the cells, not this bookkeeping pass
        result["command"], result["argv"] = previous["command"], previous.get("argv")
        result["config"]["linear"] = previous.get("config", {}).get("linear", result["config"]["linear"])
    return result, float(previous.get("elapsed_s") or 0)


MERGED_SECTIONS = ("rows", "plans", "reference")  # keyed sections that several invocations may add to


def merge_on_disk(result: dict, out: Path, baseline: dict) -> dict:
    """``result`` as it should be written to ``out``: the keyed sections (rows, sweep plans, references) of what is
    on disk now, with only the entries *this* process changed since ``baseline`` (its copy at start) laid over them,
    and the command lists united. So two invocations writing one result file (e.g. two sweeps of different methods)
    keep each other's rows instead of the last writer's snapshot winning."""
    disk = read_json(out) or {}
    merged = dict(result)
    for section in MERGED_SECTIONS:
        if not isinstance(result.get(section), dict):
            continue
        mine = {key: value for key, value in result[section].items() if baseline.get(section, {}).get(key) != value}
        merged[section] = {**(disk.get(section) if isinstance(disk.get(section), dict) else result[section]), **mine}
    if isinstance(result.get("commands"), list) and isinstance(disk.get("commands"), list):  # sweep.json's
        merged["commands"] = disk["commands"] + [c for c in result["commands"] if c not in disk["commands"]]
    return merged


def start_saving(result: dict, out: Path, base_elapsed: float, started: float):
    """Write ``result`` now and every minute (elapsed_s stays current); returns the save function. Each write is
    a read-merge-write under an exclusive lock on ``.<name>.lock`` beside it (:func:`merge_on_disk`)."""
    import copy

    (WORK / "quality").mkdir(parents=True, exist_ok=True)
    # what is on disk now: entries this process added or changed before its first save (a sweep's new plan, made by
    # start_result) count as its own, as much as those it changes later
    on_disk = read_json(out) or {}
    baseline = copy.deepcopy({section: on_disk.get(section) if isinstance(on_disk.get(section), dict) else {}
                              for section in MERGED_SECTIONS})

    def save() -> None:
        with RESULT_LOCK:
            result["elapsed_s"] = round(base_elapsed + time.time() - started, 1)
            result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out.with_name(f".{out.name}.lock"), "a") as lock:
                try:
                    import fcntl

                    fcntl.flock(lock, fcntl.LOCK_EX)
                except ImportError:  # no flock (Windows): the plain last-writer-wins write
                    pass
                write_json(out, merge_on_disk(result, out, baseline))

    def heartbeat() -> None:  # keeps elapsed_s current, so a suite killed mid-cell loses at most a minute of it
        while True:
            time.sleep(60)
            save()

    save()
    threading.Thread(target=heartbeat, daemon=True, name="quality-heartbeat").start()
    return save


def run_cells(cells, args, data, pre, teachers, result, log_path, save) -> None:
    """Run the cells, ``--jobs`` at a time. Cells that share a feature cache form one chain, run in order
    (the first builds the cache, the rest reuse it); chains run in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    threads = args.threads
    others = any(r.get("teacher_knn_top1") is not None and r["id"] not in {cell_id(c) for c in cells}
                 for r in result["rows"].values())
    first_id = None if others else next((cell_id(c) for c in cells if c["kind"] == "distill" and c["teacher"] == "sup"), None)
    chains: dict[str, list] = {}
    for cell in cells:
        command = cell_command(cell, args, data, pre, teachers, cell_id(cell) == first_id)
        cache = command[command.index("--cache") + 1] if "--cache" in command else None
        complete = cache and (read_json(Path(cache) / "manifest.json") or {}).get("complete")
        key = cache if cache and not complete else cell_id(cell)  # only a cache still to build serialises
        chains.setdefault(key, []).append((cell, command))
    # longest chains first (the long budgets would otherwise start last and finish last)
    ordered = sorted(chains.values(), key=lambda chain: -max(c["budget"] for c, _ in chain))

    def run_one(cell: dict, command: list[str]) -> None:
        steps, _ = schedule(cell["budget"], args.batch_size, data["train_images"])
        waited = False
        while running_elsewhere(cell_dir(cell)) and not args.collect:  # another suite process owns this cell: wait for it
            if not waited:
                log(f"cell {cell_id(cell)}: running in another process; waiting")
                waited = True
            time.sleep(20)
        summary = finished(cell, steps)
        if summary is None and args.collect:
            return  # --collect: record finished cells only
        if summary is None:
            log(f"cell {cell_id(cell)}: distillctl {display_command(command)}")
            t0 = time.time()
            try:
                summary = distillctl(command, log_path.with_name(f"{log_path.stem}-{cell['method']}.log"),
                                     threads=threads)
            except BenchError as exc:
                log(f"cell {cell_id(cell)} failed: {exc}")
                with RESULT_LOCK:
                    result["rows"][cell_id(cell)] = {**cell, "id": cell_id(cell), "status": "failed", "error": str(exc),
                                                     "command": "distillctl " + display_command(command)}
                    save()
                return
            log(f"cell {cell_id(cell)}: kNN {summary['student'].get('knn_top1')} in {time.time() - t0:.0f} s")
        row = row_from_summary(cell, summary, command)
        if cell.get("recorded_command"):  # a reused table cell: the command it ran with
            row["command"] = cell["recorded_command"]
        if getattr(args, "dense", False):
            row["dense"] = cell_dense(cell_dir(cell), args, data, log_path)
        with RESULT_LOCK:
            result["rows"][cell_id(cell)] = row
            if row.get("teacher_knn_top1") is not None:
                result["reference"].setdefault("teacher_knn", {})[cell["teacher"]] = row["teacher_knn_top1"]
            if row.get("random_student_knn_top1") is not None:
                result["reference"].setdefault("random_knn_pipeline", {})[cell["student"]] = row["random_student_knn_top1"]
            save()

    def run_chain(chain: list) -> None:
        for cell, command in chain:
            run_one(cell, command)

    if args.jobs <= 1:  # one at a time: in plan order (the first cell of a cache builds it)
        commands = {cell_id(cell): command for chain in chains.values() for cell, command in chain}
        for cell in cells:
            run_one(cell, commands[cell_id(cell)])
        return
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run_chain, ordered))


def running_elsewhere(run_dir: Path) -> bool:
    """True when a live process (another suite invocation, or one left from a killed suite) has
    ``--out run_dir`` on its command line."""
    needle = f"--out\0{run_dir}\0".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def run_curve(args, data, pre, teachers, result, log_path, save) -> None:
    """Best ``--curve-top`` distillation methods (by kNN at the largest budget they share) at more budgets."""
    done = [r for r in result["rows"].values() if r.get("status") == "done" and r["kind"] == "distill"
            and r["teacher"] == "sup"]
    if not done:
        return
    by_method: dict[str, dict] = {}
    for row in done:
        best = by_method.get(row["method"])
        if best is None or row["budget"] > best["budget"]:
            by_method[row["method"]] = row
    common_budget = min(r["budget"] for r in by_method.values())
    ranked = sorted((r for r in done if r["budget"] == common_budget), key=lambda r: -(r["knn_top1"] or 0))
    top = [r["method"] for r in ranked[: args.curve_top]]
    with RESULT_LOCK:
        result["curve"] = {"methods": top, "ranked_at_budget": common_budget,
                           "budgets": [int(b) for b in args.curve_budgets.split(",")]}
    cells = [{"kind": "distill", "method": m, "teacher": "sup", "student": ranked[0]["student"], "budget": b,
              "preset": args.preset}
             for b in result["curve"]["budgets"] for m in top]
    run_cells(cells, args, data, pre, teachers, result, log_path, save)


# --- the dense probe and the dense suite (issue 14) --------------------------------------------------

def dense_command(target: str, args, data: dict, extra: tuple[str, ...] = ()) -> list[str]:
    """``distillctl eval dense`` of ``target`` under the suite's probe settings (task mosaic-2x2)."""
    return ["eval", "dense", str(target), *extra, "--data", str(data["train"]), "--val-data", str(data["test"]),
            "--crop-pct", "1.0", "--mosaics", str(args.dense_mosaics), "--val-mosaics", str(args.dense_val_mosaics),
            "--epochs", str(args.dense_epochs), "--seed", str(args.seed)]


def eval_record(command: list[str], path: Path, args, log_path: Path) -> dict | None:
    """``{"result", "command"}`` of one ``distillctl eval`` command, kept in ``path`` and reused while the command is
    the same (another probe setting runs again); None under --collect when it has not run."""
    text = "distillctl " + display_command(command)
    saved = read_json(path)
    if saved and saved.get("command") == text:
        return saved
    if args.collect:
        return None
    record = {"result": distillctl(command, log_path, threads=args.threads), "command": text}
    write_json(path, record)
    return record


def dense_summary(record: dict | None) -> dict | None:
    """The dense-probe numbers a row shows: mIoU, pixel accuracy (percent), feature grid, chosen lr/wd, command."""
    if not record:
        return None
    dense = record["result"]["dense"]
    return {"miou": dense["miou"], "pixel_accuracy": dense["pixel_accuracy"], "feature_grid": dense["feature_grid"],
            "lr": dense["lr"], "weight_decay": dense["weight_decay"],
            "probe_s": (record["result"].get("timing") or {}).get("probe_s"), "command": record["command"]}


def cell_dense(run_dir: Path, args, data: dict, log_path: Path, extra: tuple[str, ...] = ()) -> dict | None:
    """Dense probe of a finished run (or a teacher: ``run_dir`` then names where the result is kept)."""
    target = str(run_dir) if not extra else extra[0]
    command = dense_command(target, args, data, extra[1:])
    try:
        return dense_summary(eval_record(command, Path(run_dir) / "dense_probe.json", args,
                                         log_path.with_name(f"{log_path.stem}-dense.log")))
    except BenchError as exc:
        log(f"dense probe of {rel(run_dir)} failed: {exc}")
        return {"error": str(exc), "command": "distillctl " + display_command(command)}


def plan_dense_cells(args, methods: list[dict]) -> list[dict]:
    """The dense suite's cells: dense methods and the best global method on the CNN student (supervised teacher),
    the CNN → ViT cell, and the cells distilled from the ViT teacher the suite pretrains."""
    names = {m["name"] for m in methods}
    cnn = split_specs(args.students)[0]
    split = lambda text: [n.strip() for n in (text or "").split(",") if n.strip() and n.strip() != "none"]  # noqa: E731
    vit_train = {"sets": list(VIT_TRAIN_SETS), "lr": args.vit_lr}
    teacher_tag = "vit-" + ssl_teacher_dir(args, args.vit_teacher).name
    cells = [{"method": m, "teacher": "sup", "student": cnn} for m in split(args.dense_methods)]
    if split(args.reference_method):
        cells.append({"method": args.reference_method, "teacher": "sup", "student": cnn, "role": "reference"})
    if split(args.vit_global_method):
        cells.append({"method": args.vit_global_method, "teacher": "sup", "student": args.vit_student, **vit_train})
    for method in split(args.vit_teacher_methods):
        sets = list(vit_train["sets"])
        if method == "attndistill" and _num_heads(args.vit_student) != _num_heads(split_teacher_spec(args.vit_teacher)[1]):
            sets.append("method.params.head_aggregation=true")  # the paper's answer to different head counts
        cells.append({"method": method, "teacher": "vit", "teacher_tag": teacher_tag, "student": args.vit_student,
                      "sets": sets, "lr": args.vit_lr})
    unknown = sorted({c["method"] for c in cells} - names)
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(names))}")
    return [{"kind": "distill", "budget": args.budget_images, "preset": args.preset, **c} for c in cells]


@functools.lru_cache(maxsize=None)
def _num_heads(arch: str) -> int | None:
    """Attention heads of a ViT spec's last block (None for other networks)."""
    import timm

    name, kwargs = arch_parts(arch)
    blocks = getattr(timm.create_model(name, pretrained=False, num_classes=0, **kwargs), "blocks", None)
    return int(blocks[-1].attn.num_heads) if blocks is not None else None


def reuse_table_cell(cell: dict, args, data: dict) -> dict:
    """The reference cell as the quality table ran it, when that cell finished (any preset, also one from before
    method.preset): it is dense-probed instead of trained again, and keeps the command it ran with."""
    steps, _ = schedule(cell["budget"], args.batch_size, data["train_images"])
    if finished(cell, steps) is not None:
        return cell
    table = (read_json(RESULTS / "quality.json") or {}).get("rows") or {}
    for preset in (None, "published", "auto"):
        candidate = {**cell, "preset": preset}
        if preset != cell["preset"] and finished(candidate, steps) is not None:
            recorded = (table.get(cell_id(candidate)) or {}).get("command")
            return {**candidate, "dir": str(cell_dir(candidate)), **({"recorded_command": recorded} if recorded else {})}
    return cell


# Training throughput of each cell at one thread, batch 64, 64 px, the suite's default archs: images per CPU second
# (metrics.jsonl's cpu_img_per_s, i.e. what one free core gives), steps 2-8 of each cell's command on 400 CIFAR-10
# images (scratch harness, 2026-11-30, Xeon 2-core machine of RESULTS.md; the teacher online where the suite caches
# it). The estimate of --dry-run; cells not listed use the slowest rate of their student family.
RATES_1T = {("vit", "compress-1q"): 34.0, ("vit", "attndistill"): 17.0, ("vit", "mae-lite"): 17.0,
            ("vit", "mae"): 17.0, ("cnn", "pcd"): 148.0, ("cnn", "dense-reg"): 170.0, ("cnn", "compress-1q"): 185.0}
# the quality table's cells ran this much slower in wall time than RATES_1T on the shared 2-core machine
# (compress-1q: 67 img/s in RESULTS.md against 185 here)
SHARED_SLOWDOWN = 185.0 / 67.0
# CPU seconds of one cell's evaluations at one thread on the 10k + 2k protocol images: kNN + linear probe, and the
# dense probe (1000 + 500 mosaics, 20 epochs), measured on the random-init students: MobileNetV2 kNN 50 s + linear
# 61 s, dense probe 32 s; ViT-Ti/8 dense probe 116 s, its kNN + linear scaled from its forward cost; x4 per doubling
# of the width (the ViT-S/8 teacher)
EVAL_S_1T = {"vit": 200.0, "cnn": 110.0}
DENSE_S_1T = {"vit": 115.0, "cnn": 35.0}


def estimate_seconds(cell: dict, args, data: dict) -> float:
    """Rough wall time of a cell: training at :data:`RATES_1T`, its kNN + linear evaluation and its dense probe, for
    the run's image size and data (ViT cost grows with the token count), divided by the threads (at best linear)."""
    family = "vit" if is_vit(cell["student"]) else "cnn"
    rate = RATES_1T.get((family, cell["method"]), min(v for (f, _), v in RATES_1T.items() if f == family))
    pixels = (args.image_size / 64) ** 2
    scale = pixels * (pixels if family == "vit" else 1)
    width = (_student_dim(cell["student"]) / 192) ** 2 if family == "vit" else 1.0
    evals = EVAL_S_1T[family] * width * (data["train_images"] + data["test_images"]) / 12_000
    dense = DENSE_S_1T[family] * width * (args.dense_mosaics + args.dense_val_mosaics) / 1_500
    return (cell["budget"] / rate + evals + dense) * scale / max(1, args.threads)


def dense_main(args, argv, data: dict, pre: dict, methods: list[dict], out: Path, started: float) -> int:
    """``--suite dense``: the cells of :func:`plan_dense_cells` (kNN, linear, dense probe), the ViT teacher they
    need, and the reference rows (teacher, random-init CNN and ViT students), written to ``out``."""
    modes = {m["name"]: m["teacher_mode"] for m in methods}
    teachers = {"sup": {"path": str(TEACHER), "arch": pre["arch"], "dim": 512, "modes": modes},
                "vit": {**teacher_entry(args, args.vit_teacher), "modes": modes}}
    cells = [reuse_table_cell(c, args, data) if c.get("role") == "reference" else c  # (reads only)
             for c in plan_dense_cells(args, methods)]
    log_path = WORK / "quality" / ("dense-quick.log" if args.quick else "dense.log")
    if args.dry_run:
        return dense_dry_run(args, data, pre, teachers, cells)
    result, base_elapsed = start_result(args, argv, data, pre, methods, out)
    result["benchmark"] = "quality-dense"
    students = sorted({c["student"] for c in cells}, key=lambda s: (is_vit(s), s))
    result["config"].update({"vit_student": args.vit_student, "vit_teacher": args.vit_teacher, "vit_lr": args.vit_lr,
                             "vit_train": list(VIT_TRAIN_SETS), "cnn_student": split_specs(args.students)[0],
                             # makes the random-init students the reference rows' eval commands read
                             "setup_command": f"python benchmarks/setup_data.py --image-size {args.image_size} "
                                              f"--random-students '{','.join(students)}'"})
    save = start_saving(result, out, base_elapsed, started)
    run_cells([c for c in cells if c["teacher"] == "sup"], args, data, pre, teachers, result, log_path, save)
    for name, row in dense_reference_rows(args, data, pre, log_path, cells).items():
        if set(row) - {"name"}:  # --collect leaves a reference that has not run as it was
            with RESULT_LOCK:
                result["reference"][name] = row
    save()
    try:
        vit = ssl_teacher(args, data, pre, log_path, args.vit_teacher)
        row = {**vit["row"], "dense": cell_dense(Path(teacher_cell(args, args.vit_teacher)["dir"]), args, data, log_path)}
        teachers["vit"].update(vit)
        with RESULT_LOCK:
            result["reference"]["vit_teacher"] = row
        save()
        run_cells([c for c in cells if c["teacher"] == "vit"], args, data, pre, teachers, result, log_path, save)
    except BenchError as exc:
        with RESULT_LOCK:
            result["reference"]["vit_teacher_error"] = str(exc)
        log(f"ViT teacher failed: {exc}")
    save()
    log(f"dense suite done in {time.time() - started:.0f} s → {out}")
    return 0


def dense_reference_rows(args, data: dict, pre: dict, log_path: Path, cells: list[dict]) -> dict:
    """kNN, linear and dense probe of the supervised teacher and of the random-init CNN and ViT students."""
    reference = WORK / "quality" / "reference"
    common = ["--data", str(data["train"]), "--val-data", str(data["test"]), "--crop-pct", "1.0"]
    teacher = [f"teacher:{TEACHER}", "--teacher-arch", pre["arch"], "--input-size", str(args.image_size)]
    students = sorted({c["student"] for c in cells}, key=lambda s: (is_vit(s), s))
    quick = "-quick" if args.quick else ""  # --quick never overwrites the full run's reference results
    targets = {"teacher": (teacher, ["--cache-dir", str(reference / "eval_cache")], reference / f"teacher{quick}")}
    for student in students:
        folder = random_student(student, args.image_size, args.seed, pre)
        targets[f"random:{student}"] = ([str(folder)], ["--no-cache"], folder.with_name(folder.name + quick))
    rows = {}
    for name, (target, cache, stem) in targets.items():
        row = {"name": name}
        for kind in ("knn",) + (() if args.no_linear else ("linear",)):
            try:
                record = eval_record(["eval", kind, *target, *cache, *common], Path(f"{stem}-{kind}.json"), args, log_path)
            except BenchError as exc:
                row[f"{kind}_error"] = str(exc)
                continue
            if record:
                row[f"{kind}_top1"] = _knn_top1(record["result"]) if kind == "knn" else record["result"]["linear"]["top1"]
                row[f"{kind}_command"] = record["command"]
        dense = cell_dense(Path(f"{stem}-dense"), args, data, log_path, extra=tuple(target))
        rows[name] = {**row, **({"dense": dense} if dense else {})}
    return rows


def dense_dry_run(args, data: dict, pre: dict, teachers: dict, cells: list[dict]) -> int:
    """Print every command of the dense suite in run order with a one-thread time estimate per cell."""
    def show(command: list[str], seconds: float) -> float:
        print(f"# ~{seconds / 60:.0f} min  distillctl {display_command(command)}")
        return seconds

    def run_or_reuse(cell: dict) -> float:
        if cell.get("dir"):  # the table's finished cell: its dense probe only
            print(f"# the table's finished cell: distillctl {display_command(dense_command(cell['dir'], args, data))}")
            return estimate_seconds({**cell, "budget": 0}, args, data)
        return show(cell_command(cell, args, data, pre, teachers, False), estimate_seconds(cell, args, data))

    total = sum(run_or_reuse(cell) for cell in cells if cell["teacher"] != "vit")
    teacher, command, _ = teacher_command(args, data, pre, args.vit_teacher)
    total += show(command, estimate_seconds(teacher, args, data))
    total += sum(run_or_reuse(cell) for cell in cells if cell["teacher"] == "vit")
    # the reference rows (teacher, random-init CNN and ViT students): evaluations only
    total += sum(estimate_seconds({"student": s, "method": "", "budget": 0}, args, data)
                 for s in (split_specs(args.students)[0],) * 2 + (args.vit_student,))
    print(f"# estimate: ~{total / 3600:.1f} h at {args.threads} thread(s) on free cores, one cell at a time (--jobs 2 on "
          f"two free cores roughly halves it; the quality table's cells ran {SHARED_SLOWDOWN:.1f}x slower than this on "
          f"the shared 2-core machine); each cell includes its kNN, linear and dense probe (task mosaic-2x2, "
          f"{args.dense_mosaics} train / {args.dense_val_mosaics} test mosaics)")
    return 0


if __name__ == "__main__":
    run_script(main)
