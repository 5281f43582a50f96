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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (RESULTS, TEACHER, WORK, BenchError, display_command, distillctl, log, machine_info,  # noqa: E402
                    protocol_subset, random_student, read_json, rel, registered_methods, require_shared, standard_data, subset_path,
                    teacher_preprocess, write_json)


# Guards ``result``: cell workers record rows and the heartbeat thread writes it (a dict changing size while
# json.dump iterates it would kill the heartbeat). Re-entrant: workers call save() while holding it.
RESULT_LOCK = threading.RLock()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: python benchmarks/quality.py --budget-images 120000 --curve\n"
                                            "Smoke:   python benchmarks/quality.py --quick",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-images", type=int, default=120_000, help="Images seen per cell (default 120000).")
    parser.add_argument("--extra", action="append", default=[], metavar="METHOD=IMAGES",
                        help="An extra cell for METHOD at another budget (repeatable; any registered method, also one left "
                             "out of --methods), e.g. --extra simreg=30000.")
    parser.add_argument("--batch-size", type=int, default=64, help="Global batch for every cell (default 64).")
    parser.add_argument("--methods", default="all",
                        help="Comma-separated distillation methods, 'all' (every registered one) or 'none'.")
    parser.add_argument("--ssl-methods", default="all", help="SSL-only baselines: comma-separated, 'all' or 'none'.")
    parser.add_argument("--students", default="mobilenetv2_100",
                        help="Comma-separated timm students (e.g. mobilenetv2_100,mobilenetv3_small_100).")
    parser.add_argument("--image-size", type=int, default=64, help="Input resolution (default 64).")
    parser.add_argument("--cache-views", type=int, default=4, help="Stored views per image in the feature cache.")
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
                        help="Tiny smoke configuration: 32 px, 1k/500-image subsets, 256 images, simreg + mocov2.")
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
    parser.add_argument("--out", default=None, help="Result JSON (default results/quality.json, quality_quick.json).")
    return parser.parse_args(argv)


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
    for student in [s.strip() for s in args.students.split(",") if s.strip()]:
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
    return f"{cell['student']}/{cell['teacher'] or 'none'}/{cell['method']}-{cell['budget']}{suffix}"


def cell_dir(cell: dict) -> Path:
    return WORK / "quality" / cell_id(cell)


def schedule(budget: int, batch: int, train_images: int) -> tuple[int, int]:
    """(max_steps, epochs): the budget in optimizer steps; the LR schedule spans the same budget."""
    steps = max(1, budget // batch)
    steps_per_epoch = max(1, train_images // batch)
    return steps, max(1, math.ceil(steps / steps_per_epoch))


@functools.lru_cache(maxsize=None)
def _student_dim(student: str) -> int:
    import timm

    return int(timm.create_model(student, pretrained=False, num_classes=0).num_features)


def cache_dir_for(method: str, teacher_key: str, teacher_dims, student: str, args: argparse.Namespace) -> Path:
    """One feature cache per (teacher, stored-view spec, outputs, K): methods asking for the same share it."""
    from distillctl.data.views import spec_dict
    from distillctl.methods.base import build_method

    student_dim = _student_dim(student)
    requirements = build_method(method, {}, student_dim, teacher_dims).requirements(args.image_size)
    teacher_views = [view.spec for view in requirements.views if view.teacher]
    key = {"teacher": teacher_key, "spec": spec_dict(teacher_views[0]) if teacher_views else None,
           "outputs": sorted(requirements.teacher_outputs), "views": args.cache_views, "seed": args.seed,
           "size": args.image_size}
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
    return [item for s in sets for item in ("--set", s)]


def cell_command(cell: dict, args: argparse.Namespace, data: dict, pre: dict, teachers: dict, first: bool) -> list[str]:
    steps, epochs = schedule(cell["budget"], args.batch_size, data["train_images"])
    out = str(cell_dir(cell))
    sets = common_sets(args, cell, steps, pre, first)
    if cell["kind"] == "ssl":
        return ["pretrain", "--method", cell["method"], "--arch", cell["student"], "--data", str(data["train"]),
                "--val-data", str(data["test"]), "--image-size", str(args.image_size), "--epochs", str(epochs),
                "--batch-size", str(args.batch_size), "--out", out, *sets]
    teacher = teachers[cell["teacher"]]
    command = ["run", "--method", cell["method"], "--teacher", teacher["path"], "--teacher-arch", teacher["arch"],
               "--student", cell["student"], "--data", str(data["train"]), "--val-data", str(data["test"]),
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
            "--cache", str(cache_dir_for(cell["method"], teacher.get("key", cell["teacher"]), dims, cell["student"], args))]
    return command


def finished(cell: dict, steps: int) -> dict | None:
    summary = read_json(cell_dir(cell) / "summary.json")
    if not summary or summary.get("recipe", {}).get("train", {}).get("max_steps") != steps:
        return None
    if cell.get("preset") and (summary.get("recipe", {}).get("method") or {}).get("preset") != cell["preset"]:
        return None
    if summary.get("student", {}).get("knn_top1") is None or summary.get("train", {}).get("steps") != steps:
        return None
    return summary


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


def ssl_teacher_dir(args) -> Path:
    """Where ``--ssl-teacher METHOD:ARCH:IMAGES`` is pretrained (one folder per preset)."""
    method, arch, images = args.ssl_teacher.split(":")
    return WORK / "quality" / "ssl-teacher" / f"{method}-{arch}-{images}-{args.preset}"


def ssl_teacher(args, data, pre, log_path: Path) -> dict:
    """Pretrain the SSL teacher with ``distillctl pretrain`` (resumable like any cell)."""
    method, arch, images = args.ssl_teacher.split(":")
    cell = {"kind": "ssl-teacher", "method": method, "teacher": None, "student": arch, "budget": int(images),
            "preset": args.preset}
    steps, epochs = schedule(cell["budget"], args.batch_size, data["train_images"])
    out = ssl_teacher_dir(args)
    sets = common_sets(args, cell, steps, pre, first=False)
    command = ["pretrain", "--method", method, "--arch", arch, "--data", str(data["train"]), "--val-data",
               str(data["test"]), "--image-size", str(args.image_size), "--epochs", str(epochs), "--batch-size",
               str(args.batch_size), "--out", str(out), *sets]
    summary = read_json(out / "summary.json")
    done = summary and summary.get("train", {}).get("steps") == steps and summary["student"].get("knn_top1") is not None
    if not done and args.collect:
        raise BenchError("SSL teacher not trained yet (--collect runs nothing)")
    if not done:
        log(f"SSL teacher: distillctl {display_command(command)}")
        summary = distillctl(command, log_path, threads=args.threads)
    row = row_from_summary(cell, summary, command)
    import timm

    dim = timm.create_model(arch, pretrained=False, num_classes=0).num_features
    return {"path": str(out / "student" / "model.safetensors"), "arch": arch, "dim": dim, "row": row,
            "key": f"ssl-{method}-{arch}-{images}-{args.preset}"}


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
        out = random_dir.parent / f"random-{student}-{kind}.json"
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
        import os

        args.threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    make = not args.dry_run  # a dry run prints the commands: it unpacks, builds and writes nothing
    if args.quick:
        args.budget_images, args.batch_size, args.image_size, args.cache_views = 256, 32, 32, 2
        args.methods = "simreg" if args.methods == "all" else args.methods
        args.ssl_methods = "mocov2" if args.ssl_methods == "all" else args.ssl_methods
        subsets = {key: (protocol_subset(name) if make else subset_path(name))
                   for key, name in (("train", "train1k"), ("test", "test500"))}
        data = {"train": rel(subsets["train"]), "test": rel(subsets["test"]), "train_images": 1000, "test_images": 500}
    else:
        data = {**standard_data(make), "train_images": 10_000, "test_images": 2_000}
    out = Path(args.out) if args.out else RESULTS / ("quality_quick.json" if args.quick else "quality.json")
    pre = teacher_preprocess()
    methods = registered_methods()
    modes = {m["name"]: m["teacher_mode"] for m in methods}
    teachers = {"sup": {"path": str(TEACHER), "arch": pre["arch"], "dim": 512, "modes": modes}}
    cells = plan_cells(args, methods)
    log_path = WORK / "quality" / ("quick.log" if args.quick else "suite.log")
    previous = read_json(out) or {}
    result = {"benchmark": "quality", "argv": sys.argv[1:] if argv is None else argv,
              "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "config": {"budget_images": args.budget_images, "extra_budgets": _budgets(args),
                         "batch_size": args.batch_size, "image_size": args.image_size, "cache_views": args.cache_views,
                         "seed": args.seed, "students": args.students, "linear": not args.no_linear,
                         "train_images": data["train_images"], "test_images": data["test_images"],
                         "data": {"train": Path(data["train"]).name, "test": Path(data["test"]).name},
                         "teacher": {"file": TEACHER.name, **pre}, "ssl_teacher": args.ssl_teacher,
                         "registered_methods": methods},
              "machine": machine_info(), "started_utc": previous.get("started_utc") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "rows": {}, "reference": previous.get("reference", {}), "curve": previous.get("curve", {})}
    result["rows"] = {k: v for k, v in (previous.get("rows") or {}).items()}
    if args.collect and previous.get("command"):  # the command that ran the cells, not this bookkeeping pass
        result["command"], result["argv"] = previous["command"], previous.get("argv")
        result["config"]["linear"] = previous.get("config", {}).get("linear", result["config"]["linear"])
    base_elapsed = float(previous.get("elapsed_s") or 0)
    if args.dry_run:
        if args.ssl_teacher != "none":
            method, arch, images = args.ssl_teacher.split(":")
            teachers["ssl"] = {"path": str(ssl_teacher_dir(args) / "student" / "model.safetensors"), "arch": arch,
                               "dim": 512, "modes": modes, "key": f"ssl-{method}-{arch}-{images}-{args.preset}"}
        for i, cell in enumerate(cells):
            print("distillctl " + display_command(cell_command(cell, args, data, pre, teachers, i == 0)))
        return 0
    (WORK / "quality").mkdir(parents=True, exist_ok=True)

    def save() -> None:
        with RESULT_LOCK:
            result["elapsed_s"] = round(base_elapsed + time.time() - started, 1)
            result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            write_json(out, result)

    def heartbeat() -> None:  # keeps elapsed_s current, so a suite killed mid-cell loses at most a minute of it
        while True:
            time.sleep(60)
            save()

    save()
    threading.Thread(target=heartbeat, daemon=True, name="quality-heartbeat").start()
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


def run_cells(cells, args, data, pre, teachers, result, log_path, save) -> None:
    """Run the cells, ``--jobs`` at a time. Cells that share a feature cache form one chain, run in order
    (the first builds the cache, the rest reuse it); chains run in parallel."""
    import os
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


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1)
