"""One-factor-at-a-time sweep of a method's preset-derived settings on the quality protocol (issue 16 §2): which
setting moves a weak method.

Per method and budget the cells are ``published`` (``method.preset=published``: every value as the paper),
``auto`` (every value ``method.preset=auto`` derives for this run) and, for every key that ``auto`` derives
differently from ``published``, ``published`` with that one key at its ``auto`` value, so each factor's effect is
isolated. The keys and values come from the product's own derivation (``distillctl.methods.presets.derive``) for
the protocol's size (training images, batch, images seen). ``--grid KEY=V1,V2`` adds one-factor points of the
published base (queue length, lr, a temperature, …); ``--suspects`` adds the lr at ⅓× and 3× the paper's and each
set temperature at ½× and 2×. ``--leave-one-out`` adds, where ``auto`` changes several keys, ``auto`` with each of
them back at its published value (``auto-KEY``): with interacting settings, which of them ``auto`` needs, where a
one-factor point from ``published`` shows only what each does alone. Cells that would run the same settings as
another are planned once. ``--variants``
runs part of the plan (the rest is reported as not run yet, with the command that runs it).

Every cell is a real ``distillctl run`` built by quality.py's command builder on the same protocol (CIFAR-10
train10k / test2k, 64 px, batch 64, the supervised ResNet-18 teacher, the shared feature caches), in
benchmarks/work/sweep/. Resumable: a finished cell is skipped (a finished quality-table cell with the same
settings is reused). Writes benchmarks/results/sweep.json after every cell; rows of other methods are kept.
``--ssl-teacher METHOD:ARCH:IMAGES`` sweeps distillation from the self-supervised teacher quality.py pretrained
under that spec instead (its cells in benchmarks/work/sweep/<student>/ssl/, its rows in
benchmarks/results/sweep_ssl_teacher.json): what moves a method's student/teacher ratio from an SSL teacher.

Example: python benchmarks/sweep.py --methods smd,disco --jobs 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's distillctl (the preset policy)

import quality  # noqa: E402
from common import (RESULTS, TEACHER, WORK, BenchError, arch_tag, display_command, distillctl, log,  # noqa: E402
                    default_threads, machine_info, read_json, registered_methods, rel, require_shared, run_script,
                    teacher_preprocess)

PUBLISHED, AUTO = "published", "auto"
DEFAULT_BUDGET = 30_000  # the quality table's budget, where the weak methods were measured


class SweepUsage(ValueError):
    """A bad --grid or --methods value (exit 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: python benchmarks/sweep.py --methods smd,disco --jobs 2 --threads 1\n"
                                            "         python benchmarks/sweep.py --methods seed --grid "
                                            "method.params.queue_size=1024,4096 --grid train.lr=0.01 --dry-run\n"
                                            "Smoke:   python benchmarks/sweep.py --methods seed --quick",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", required=True, help="Comma-separated distillation methods to sweep.")
    parser.add_argument("--budget-images", type=int, default=None,
                        help=f"Images seen per cell (default {DEFAULT_BUDGET}; --quick: 256).")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="Extra one-factor points of the published base, e.g. method.params.queue_size=1024,4096 or "
                             "train.lr=0.01,0.03 (repeatable; a method without the key skips it).")
    parser.add_argument("--variants", default=None, metavar="NAMES",
                        help="Run only these planned variants (comma-separated names as --dry-run prints them, e.g. "
                             "published,+queue_size); the others stay in the plan as not run yet.")
    parser.add_argument("--suspects", action="store_true",
                        help="Also the lr at 1/3x and 3x the paper's, and each set temperature at 1/2x and 2x.")
    parser.add_argument("--leave-one-out", action="store_true",
                        help="Also auto with each derived key back at its published value (auto-KEY), where auto "
                             "derives more than one: which of auto's changes the result needs.")
    parser.add_argument("--batch-size", type=int, default=None, help="Global batch (default 64; --quick: 32).")
    parser.add_argument("--image-size", type=int, default=None, help="Input resolution (default 64; --quick: 32).")
    parser.add_argument("--cache-views", type=int, default=None, help="Stored views per cached image (default 4; --quick: 2).")
    parser.add_argument("--students", default="mobilenetv2_100", help="The timm student (one).")
    parser.add_argument("--seed", type=int, default=0, help="Run seed of every cell.")
    parser.add_argument("--no-linear", action="store_true", help="Skip the linear probe (kNN only; saves ~1 min a cell).")
    parser.add_argument("--no-channels-last", action="store_true", help="Train in NCHW (default channels_last).")
    parser.add_argument("--online", default="", metavar="METHODS", help="Methods run with the teacher online.")
    parser.add_argument("--ssl-teacher", default="none", metavar="METHOD:ARCH:IMAGES",
                        help="Distil from the SSL teacher quality.py pretrained under this spec (e.g. "
                             "simclr:resnet18:1000000; it must have finished) instead of the supervised one.")
    parser.add_argument("--jobs", type=int, default=1, help="Cells run in parallel (cells sharing a cache still "
                                                            "in the making run in order).")
    parser.add_argument("--threads", type=int, default=None, help="OMP/torch threads per cell (default cores / jobs).")
    parser.add_argument("--quick", action="store_true", help="Tiny smoke configuration (32 px, 1k/500-image subsets, "
                                                             "256 images); flags given explicitly win.")
    parser.add_argument("--collect", action="store_true", help="Run nothing: record the cells that already finished.")
    parser.add_argument("--dry-run", action="store_true",
                        help="Print the cells, their commands and a time estimate; run, unpack and write nothing.")
    parser.add_argument("--out", default=None, help="Result JSON (default results/sweep.json, with --ssl-teacher "
                                                    "sweep_ssl_teacher.json; --quick: sweep_quick.json).")
    args = parser.parse_args(argv)
    defaults = ({"budget_images": 256, "batch_size": 32, "image_size": 32, "cache_views": 2} if args.quick else
                {"budget_images": DEFAULT_BUDGET, "batch_size": 64, "image_size": 64, "cache_views": 4})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # what quality.py's command builder reads besides the above
    args.ssl_teacher_mode, args.preset = "auto", PUBLISHED
    return args


# --- the plan (pure) ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One sweep cell's settings: the preset and the ``--set`` overrides on top of it. ``factors`` are the keys
    (and values) in which it differs from ``published``; ``source`` says where the point came from."""

    name: str
    preset: str
    sets: tuple[str, ...] = ()
    factors: dict[str, Any] = field(default_factory=dict)
    source: str = "published"

    @property
    def slug(self) -> str:
        """Its run folder's name: the settings themselves, so a changed derivation never reuses an old cell."""
        return self.preset + "".join(f"+{item.removeprefix('method.params.')}" for item in self.sets)

    def as_record(self) -> dict[str, Any]:
        return {"name": self.name, "preset": self.preset, "sets": list(self.sets), "factors": dict(self.factors),
                "source": self.source}


def short(key: str) -> str:
    """``method.params.queue_size`` → ``queue_size``; train keys keep their section (``train.lr``)."""
    return key.removeprefix("method.params.")


def fmt(value: Any) -> str:
    """A value as ``--set`` text that YAML reads back as the same value: 8192, 0.0075, 0.00005 (YAML 1.1 reads
    ``5e-05`` as a string), true."""
    if isinstance(value, float) and math.isfinite(value):
        return format(Decimal(repr(value)), "f")
    if isinstance(value, str) and value.isidentifier() and yaml.safe_load(value) == value:
        return value  # a plain word (batch, weak) needs no quotes, which would also land in the cell's folder name
    return json.dumps(value)


def run_size(train_images: int, batch_size: int, budget: int):
    """The presets' RunSize of a cell, as the pipeline computes it (whole steps of the batch; the default
    optimizer of the recipe)."""
    from distillctl.config import TrainConfig
    from distillctl.methods.presets import RunSize

    steps = max(1, budget // batch_size)
    return RunSize(train_images, batch_size, steps * batch_size, TrainConfig.model_fields["optimizer"].default)


def derived_values(facts, size, preset: str) -> dict[str, Any]:
    """``{key: value}`` of what ``preset`` derives for this run (keys it leaves unchanged omitted)."""
    from distillctl.methods.presets import derive

    return {d.key: d.value for d in derive(facts, size, preset) if d.value is not None}


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["train.lr=0.01,0.03", …]`` → ``{"train.lr": ["0.01", "0.03"]}`` (a key given twice adds its points)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        points = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not points:
            raise SweepUsage(f"--grid expects KEY=V1,V2, got '{item}' (e.g. method.params.queue_size=1024,4096)")
        key = key.strip()
        if not (key.startswith("method.params.") or key.startswith("train.")):
            raise SweepUsage(f"--grid key '{key}' is neither method.params.* nor train.* (e.g. train.lr)")
        grid.setdefault(key, []).extend(p for p in points if p not in grid.get(key, []))
    return grid


def _number(text: str) -> Any:
    """``--set`` text as the recipe reads it (YAML), except that ``1e-4`` is the number YAML 1.1 leaves a string."""
    from distillctl.config import parse_value

    value = parse_value(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _nice(value: float) -> float:
    return float(f"{value:.4g}")


def suspect_grid(facts, published: dict[str, Any]) -> dict[str, list[str]]:
    """The issue's other suspects as one-factor points: the lr at ⅓× and 3× the paper's (at this batch; the recipe's
    default lr for a method without a published recipe), each temperature the method sets (``*temperature`` params
    with a value) at ½× and 2×."""
    from distillctl.config import TrainConfig

    grid: dict[str, list[str]] = {}
    lr = published.get("train.lr") or TrainConfig.model_fields["lr"].default
    if lr:  # (a method without a published recipe trains at the recipe's default lr)
        grid["train.lr"] = [fmt(_nice(lr / 3)), fmt(_nice(lr * 3))]
    for name, value in sorted(facts.defaults.items()):
        if (name == "temperature" or name.endswith("_temperature")) and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            grid[f"method.params.{name}"] = [fmt(_nice(value / 2)), fmt(_nice(value * 2))]
    return grid


def plan_variants(facts, size, grid: dict[str, list[str]] | None = None, suspects: bool = False,
                  leave_one_out: bool = False) -> list[Variant]:
    """The sweep's cells for one method and run size: ``published``, ``auto`` (when it derives anything
    differently), one variant per differing key (when more than one differs: with one, ``auto`` is that variant),
    with ``leave_one_out`` ``auto`` with each differing key at its published value (``auto-KEY``), then the ``grid``
    points (and ``suspects``) as one-factor variants of ``published``. A point whose settings equal an earlier
    variant's (e.g. a grid value equal to the published or the auto one) is planned once."""
    from distillctl.config import TrainConfig

    published = derived_values(facts, size, PUBLISHED)
    auto = derived_values(facts, size, AUTO)
    differing = {key: value for key, value in auto.items() if not _same(value, published.get(key))}
    variants = [Variant(PUBLISHED, PUBLISHED)]
    if differing:
        variants.append(Variant(AUTO, AUTO, factors=dict(differing), source="auto"))
    if len(differing) > 1:
        variants += [Variant(f"+{short(key)}", PUBLISHED, (f"{key}={fmt(value)}",), {key: value}, source="auto")
                     for key, value in sorted(differing.items())]
    if leave_one_out and len(differing) > 1:
        for key in sorted(differing):
            paper = published[key] if key in published else facts.defaults.get(short(key))
            candidate = Variant(f"auto-{short(key)}", AUTO, (f"{key}={fmt(paper)}",),
                                {k: v for k, v in differing.items() if k != key}, source="leave-one-out")
            if not any(_same_factors(v.factors, candidate.factors) for v in variants):
                variants.append(candidate)
    points = dict(suspect_grid(facts, published)) if suspects else {}
    for key, values in (grid or {}).items():
        points[key] = list(dict.fromkeys([*points.get(key, []), *values]))
    for key, values in points.items():
        name = key.removeprefix("method.params.")
        if key.startswith("method.params.") and name not in facts.defaults:
            continue  # another method's key: this one has no such param
        if key.startswith("train.") and key.removeprefix("train.") not in TrainConfig.model_fields:
            raise SweepUsage(f"--grid key '{key}' is not a train setting ({', '.join(sorted(TrainConfig.model_fields))})")
        base = published.get(key, facts.defaults.get(name) if key.startswith("method.params.") else None)
        for text in values:
            value = _number(text)
            if base is not None and _same(value, base):
                continue  # the published cell itself
            text = fmt(value) if isinstance(value, (int, float)) else text
            candidate = Variant(f"{short(key)}={text}", PUBLISHED, (f"{key}={text}",), {key: value}, source="grid")
            if not any(_same_factors(v.factors, candidate.factors) for v in variants):
                variants.append(candidate)
    return variants


def _same_factors(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two variants run the same settings when they differ from ``published`` in the same keys by the same values
    (``auto`` with one derived key is ``published`` + that key)."""
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


def grid_keys_known(grid: dict[str, list[str]], facts_by_method: dict[str, Any]) -> None:
    """A ``method.params`` grid key that none of the swept methods has is a typo: refuse it (exit 2)."""
    for key in grid:
        if key.startswith("method.params.") and not any(short(key) in f.defaults for f in facts_by_method.values()):
            raise SweepUsage(f"--grid key '{key}': none of {', '.join(facts_by_method)} has a param "
                             f"'{short(key)}'")


# --- cells -------------------------------------------------------------------------------------------

def row_key(method: str, budget: int, variant: str) -> str:
    """The row of one cell in sweep.json: ``smd-30000/+queue_size``."""
    return f"{method}-{budget}/{variant}"


def teacher_key(args: argparse.Namespace) -> str:
    """Which of quality.py's teachers the cells distil from: ``sup`` (the shared supervised one) or ``ssl``."""
    return "sup" if args.ssl_teacher == "none" else "ssl"


def sweep_cell(method: str, variant: Variant, args: argparse.Namespace) -> dict:
    """A quality.py cell (its command builder's input) for one variant, in its own run folder."""
    teacher = teacher_key(args)
    folder = WORK / "sweep" / arch_tag(args.students) / teacher / f"{method}-{args.budget_images}" / variant.slug
    return {"kind": "distill", "method": method, "teacher": teacher, "student": args.students,
            "budget": args.budget_images, "preset": variant.preset, "sets": list(variant.sets), "dir": str(folder),
            "variant": variant.name}


def cell_args(args: argparse.Namespace, cell: dict) -> argparse.Namespace:
    """quality.py's settings for one cell (its ``method.preset`` comes from ``args.preset``)."""
    return argparse.Namespace(**{**vars(args), "preset": cell["preset"]})


def table_twin(cell: dict, steps: int, published: dict[str, Any], auto_is_published: bool = False) -> dict | None:
    """The quality table's finished cell with the same settings, reused instead of trained again (None: there is
    none): a cell of the same preset without overrides; for ``published`` also the table's ``auto`` cell when
    ``auto`` derives every value as the paper for this run (``auto_is_published``: the plan has no ``auto``
    variant), or a cell from before method.preset whose recipe holds every published value (``published``: key →
    value; the lr it ran at included)."""
    if cell["sets"]:
        return None
    twin = {key: value for key, value in cell.items() if key not in ("dir", "sets", "variant")}
    if quality.finished(twin, steps) is not None:
        return twin
    if cell["preset"] == PUBLISHED and auto_is_published:
        same = {**twin, "preset": AUTO}
        summary = quality.finished(same, steps)
        if summary is not None and _holds(summary, published):
            return {**same, "command_preset": AUTO}
    legacy = {**twin, "preset": None}
    summary = quality.finished(legacy, steps) if cell["preset"] == PUBLISHED else None
    recipe = (summary or {}).get("recipe") or {}
    if summary is None or (recipe.get("method") or {}).get("preset") not in (None, PUBLISHED):
        return None
    if _holds(summary, published):
        # its command as the sweep would write it: same folder, the preset pinned (the lr is the published one)
        return {**legacy, "dir": str(quality.cell_dir(legacy)), "command_preset": PUBLISHED}
    return None


def _holds(summary: dict, values: dict[str, Any]) -> bool:
    """Does a finished run's recipe hold every ``values`` entry (dotted key → value; numbers compared closely)?"""
    recipe = summary.get("recipe") or {}
    return all(_same(_at(recipe, key), value) for key, value in values.items())


def _at(recipe: dict, key: str) -> Any:
    """The value of a dotted recipe key (``method.params.queue_size``) in a summary's recipe, None when absent."""
    node: Any = recipe
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def plan_check(summary: dict, variant: dict) -> dict:
    """Does the finished run carry the planned settings? ``auto``: its recorded ``derived`` values equal the plan's;
    overrides: the recipe holds each ``--set`` value. ``{"ok": bool, "mismatches": [...]}``."""
    recipe = summary.get("recipe") or {}
    mismatches = []
    if variant["preset"] == AUTO:
        recorded = recipe.get("derived") or {}
        for key, value in variant["factors"].items():
            got = (recorded.get(key) or {}).get("value")
            if not _same(got, value):
                mismatches.append(f"{key}: planned {value!r}, derived {got!r}")
    for item in variant["sets"]:
        key, _, text = item.partition("=")
        node = _at(recipe, key)
        if not _same(node, _number(text)):
            mismatches.append(f"{key}: set {text}, recipe {node!r}")
    return {"ok": not mismatches, "mismatches": mismatches}


# --- time estimate -----------------------------------------------------------------------------------

def table_rates(results: Path = RESULTS) -> tuple[dict[str, float], float | None]:
    """Per method, the training img/s the quality table measured (its cells ran one thread each, two at a time on
    the 2-core machine), and the median evaluation + set-up time of a cell (its wall time minus training)."""
    rates: dict[str, float] = {}
    overheads = []
    for path in sorted(results.glob("quality*.json")):
        if "quick" in path.name:
            continue
        for row in ((read_json(path) or {}).get("rows") or {}).values():
            if row.get("status") != "done" or row.get("kind") != "distill" or row.get("teacher") != "sup":
                continue
            if row.get("images_per_sec"):
                rates.setdefault(row["method"], float(row["images_per_sec"]))
            if row.get("cell_wall_s") and row.get("train_wall_s") and not row.get("train_wall_estimated"):
                overheads.append(float(row["cell_wall_s"]) - float(row["train_wall_s"]))
    return rates, (statistics.median(overheads) if overheads else None)


def estimate_seconds(method: str, args: argparse.Namespace, data: dict, rates: dict[str, float],
                     overhead: float | None) -> tuple[float, str]:
    """One cell's wall time and how it was estimated: the table's measured img/s for the method (else quality.py's
    one-thread rate slowed as the table's cells were) plus the table's median evaluation time."""
    if method in rates and not args.quick:
        train, how = args.budget_images / rates[method], f"table's {rates[method]:.0f} img/s"
    else:
        cell = {"student": args.students, "method": method, "budget": args.budget_images}
        shape = argparse.Namespace(**{**vars(args), "dense_mosaics": 0, "dense_val_mosaics": 0, "threads": 1})
        train = quality.estimate_seconds(cell, shape, data) * quality.SHARED_SLOWDOWN
        return train, "quality.py's one-thread rate × the table's slowdown"
    return train + (overhead or 0.0), how + (" + table's median eval time" if overhead else "")


# --- main --------------------------------------------------------------------------------------------

def plan(args: argparse.Namespace, data: dict) -> dict[str, tuple[list[Variant], dict[str, Any]]]:
    """Every swept method's variants for this run's size and the values ``published`` gives it (unknown or
    non-distillation methods: exit 2)."""
    from distillctl.methods.base import get_method
    from distillctl.methods.presets import method_facts

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if not names:
        raise SweepUsage("--methods names no method")
    facts = {}
    for name in names:
        try:
            cls = get_method(name)
        except Exception as exc:  # noqa: BLE001 - the registry's own unknown-name message
            raise SweepUsage(str(exc).splitlines()[0]) from None
        if getattr(cls, "kind", "distill") != "distill":
            raise SweepUsage(f"{name} is not a distillation method (the sweep distils from the table's teacher)")
        facts[name] = method_facts(cls)
    grid = parse_grid(args.grid)
    grid_keys_known(grid, facts)
    size = run_size(data["train_images"], args.batch_size, args.budget_images)
    planned = {name: (plan_variants(f, size, grid, args.suspects, args.leave_one_out),
                      derived_values(f, size, PUBLISHED))
               for name, f in facts.items()}
    params_valid(planned)
    return planned


def chosen_variants(names: str | None, planned: dict[str, list[Variant]]) -> set[str] | None:
    """The ``--variants`` names to run (None: all); a name no swept method plans is a typo (exit 2)."""
    if names is None:
        return None
    chosen = {n.strip() for n in names.split(",") if n.strip()}
    known = {v.name for variants in planned.values() for v in variants}
    unknown = sorted(chosen - known)
    if not chosen or unknown:
        raise SweepUsage(f"--variants {', '.join(unknown) or '(none)'}: not planned; planned: {', '.join(sorted(known))}")
    return chosen


def params_valid(planned: dict) -> None:
    """Every variant's method params are values its method accepts (a bad ``--grid`` value is exit 2 before any
    cell runs; the cache key is built from them)."""
    from distillctl.config import typed_method_params
    from distillctl.errors import UsageError

    for name, (variants, _) in planned.items():
        for variant in variants:
            params = {key.removeprefix("method.params."): value for key, value in variant.factors.items()
                      if key.startswith("method.params.")}
            try:
                typed_method_params(name, params, "method.params")
            except UsageError as exc:
                raise SweepUsage(str(exc).splitlines()[0]) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_shared()
    started = time.time()
    if args.threads is None:
        args.threads = default_threads(args.jobs)
    data = quality.suite_data(args, make=not args.dry_run)
    try:
        variants = plan(args, data)
    except SweepUsage as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pre = teacher_preprocess()
    modes = {m["name"]: m["teacher_mode"] for m in registered_methods()}
    teachers = {"sup": {"path": str(TEACHER), "arch": pre["arch"], "dim": 512, "modes": modes}}
    if args.ssl_teacher != "none":
        try:
            teachers["ssl"] = {**ssl_teacher_entry(args, require=not args.dry_run), "modes": modes}
        except (SweepUsage, BenchError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    steps, _ = quality.schedule(args.budget_images, args.batch_size, data["train_images"])
    try:
        chosen = chosen_variants(args.variants, {m: planned for m, (planned, _) in variants.items()})
    except SweepUsage as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cells = []
    for method, (planned, published) in variants.items():
        for variant in planned:
            if chosen is not None and variant.name not in chosen:
                continue
            cell = sweep_cell(method, variant, args)
            twin = table_twin(cell, steps, published, auto_is_published=all(v.name != AUTO for v in planned))
            run = twin or cell
            shown = {**run, "preset": run.get("command_preset") or run["preset"]}
            command = quality.cell_command(shown, cell_args(args, shown), data, pre, teachers, False)
            cells.append((cell, variant, command, twin))
    if args.dry_run:
        return dry_run(args, data, cells)
    out = Path(args.out) if args.out else RESULTS / ("sweep_quick.json" if args.quick else
                                                     "sweep.json" if args.ssl_teacher == "none" else
                                                     "sweep_ssl_teacher.json")
    result, base_elapsed = start_result(args, argv, data, out, {m: planned for m, (planned, _) in variants.items()},
                                        teachers.get("ssl"))
    save = quality.start_saving(result, out, base_elapsed, started)
    run_sweep(cells, args, steps, result, save)
    save()
    log(f"sweep done in {time.time() - started:.0f} s → {out}")
    return 0


def ssl_teacher_entry(args: argparse.Namespace, require: bool = True) -> dict:
    """quality.py's entry for the ``--ssl-teacher`` it pretrained (under its default ``method.preset=auto``), with
    the teacher's own kNN; a teacher that has not finished is a usage error naming the command that makes it
    (``require=False``, the dry run: a note, and the plan is printed all the same)."""
    table_args = argparse.Namespace(**{**vars(args), "preset": AUTO})
    folder = quality.ssl_teacher_dir(table_args)
    summary = read_json(folder / "summary.json") or {}
    knn = (summary.get("student") or {}).get("knn_top1")
    if knn is None:
        message = (f"the SSL teacher {args.ssl_teacher} has not been pretrained ({folder} has no finished run): "
                   f"python benchmarks/quality.py --methods none --ssl-methods none --ssl-teacher "
                   f"{args.ssl_teacher} --ssl-teacher-methods none --out benchmarks/results/quality_ssl_teacher.json "
                   "makes it")
        if require:
            raise SweepUsage(message)
        print(f"# note: {message}")
    linear = (((summary.get("eval") or {}).get("student") or {}).get("linear") or {}).get("top1")
    return {**quality.teacher_entry(table_args, args.ssl_teacher), "spec": args.ssl_teacher, "knn_top1": knn,
            "linear_top1": linear}


def invocation(argv: list[str] | None, runs: bool = False) -> str:
    """The command line of this invocation; ``runs``: as the command that runs every planned cell (without
    --collect, and without a --variants selection)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if runs:
        kept, skip = [], False
        for a in args:
            if skip or a == "--collect" or a.startswith("--variants="):
                skip = False
                continue
            if a == "--variants":
                skip = True
                continue
            kept.append(a)
        args = kept
    return "python benchmarks/sweep.py " + " ".join(args)


def dry_run(args: argparse.Namespace, data: dict, cells: list) -> int:
    """Print every cell's command with its estimate, and the total."""
    rates, overhead = table_rates()
    total, per_method = 0.0, {}
    for cell, variant, command, twin in cells:
        if twin is not None:
            print(f"# {cell['method']} {variant.name}: the quality table's finished cell "
                  f"{quality.cell_id(twin)} is reused")
            continue
        seconds, how = estimate_seconds(cell["method"], args, data, rates, overhead)
        total += seconds
        per_method[cell["method"]] = per_method.get(cell["method"], 0) + 1
        overrides = " ".join(variant.sets) or "-"
        print(f"# {cell['method']} {variant.name} (method.preset={variant.preset}; overrides: {overrides}) "
              f"~{seconds / 60:.0f} min ({how})")
        print("distillctl " + display_command(command))
    count = sum(per_method.values())
    print(f"# estimate: {count} cells to run ({', '.join(f'{m} {n}' for m, n in per_method.items()) or 'none'}), "
          f"~{total / 3600:.1f} h one at a time at the quality table's measured speed (one thread per cell, two cells "
          f"at a time on the shared 2-core machine: --jobs 2 --threads 1 takes about half)")
    return 0


def start_result(args, argv, data, out: Path, variants: dict[str, list[Variant]],
                 ssl_teacher: dict | None = None) -> tuple[dict, float]:
    """The result document: rows, plans and commands of earlier invocations kept (other methods, other budgets);
    with ``ssl_teacher`` (its quality.py entry) the teacher the cells distilled from, with its own kNN."""
    previous = read_json(out) or {}
    plans = dict(previous.get("plans") or {})
    for method, planned in variants.items():
        plans[f"{method}-{args.budget_images}"] = {"method": method, "budget": args.budget_images,
                                                  "variants": [v.as_record() for v in planned],
                                                  "command": invocation(argv, runs=True)}
    commands = list(previous.get("commands") or [])
    if not args.collect and invocation(argv) not in commands:
        commands.append(invocation(argv))
    result = {"benchmark": "sweep", "commands": commands, "plans": plans,
              "config": {"batch_size": args.batch_size, "image_size": args.image_size, "cache_views": args.cache_views,
                         "seed": args.seed, "student": args.students, "linear": not args.no_linear,
                         "train_images": data["train_images"], "test_images": data["test_images"],
                         "data": {"train": Path(data["train"]).name, "test": Path(data["test"]).name},
                         "teacher": TEACHER.name if ssl_teacher is None else rel(ssl_teacher["path"])},
              "machine": machine_info(), "rows": dict(previous.get("rows") or {}),
              **({"ssl_teacher": {**{key: ssl_teacher.get(key) for key in ("spec", "arch", "knn_top1", "linear_top1")},
                                  "path": rel(ssl_teacher["path"])}} if ssl_teacher else {}),
              "started_utc": previous.get("started_utc") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return result, float(previous.get("elapsed_s") or 0)


def run_sweep(cells: list, args: argparse.Namespace, steps: int, result: dict, save) -> None:
    """Run the cells, ``--jobs`` at a time; cells sharing a feature cache that is not complete yet run in order
    (the first builds it)."""
    from concurrent.futures import ThreadPoolExecutor

    chains: dict[str, list] = {}
    for entry in cells:
        command = entry[2]
        cache = command[command.index("--cache") + 1] if "--cache" in command else None
        complete = cache and (read_json(Path(cache) / "manifest.json") or {}).get("complete")
        chains.setdefault(cache if cache and not complete else entry[0]["dir"], []).append(entry)

    def run_one(cell: dict, variant: Variant, command: list[str], twin: dict | None) -> None:
        run = twin or cell
        key = row_key(cell["method"], cell["budget"], variant.name)
        while quality.running_elsewhere(quality.cell_dir(run)) and not args.collect:
            time.sleep(20)
        summary = quality.finished(run, steps)
        if summary is None and args.collect:
            return
        if summary is None:
            log(f"sweep {key}: distillctl {display_command(command)}")
            try:
                summary = distillctl(command, WORK / "sweep" / f"{cell['method']}.log", threads=args.threads)
            except BenchError as exc:
                log(f"sweep {key} failed: {exc}")
                with quality.RESULT_LOCK:
                    result["rows"][key] = {**cell, "id": key, "status": "failed", "error": str(exc),
                                           "overrides": list(variant.sets), "factors": variant.factors,
                                           "command": "distillctl " + display_command(command)}
                    save()
                return
            log(f"sweep {key}: kNN {summary['student'].get('knn_top1')}")
        row = {**quality.row_from_summary(run, summary, command), "id": key, "variant": variant.name,
               "preset": variant.preset,  # (a reused cell from before method.preset ran the same values)
               "overrides": list(variant.sets), "factors": variant.factors, "source": variant.source,
               "plan_check": plan_check(summary, variant.as_record())}
        if twin is not None:
            row["reused"] = quality.cell_id(twin)
        if not row["plan_check"]["ok"]:
            log(f"sweep {key}: the run does not carry the planned settings: {row['plan_check']['mismatches']}")
        with quality.RESULT_LOCK:
            result["rows"][key] = row
            save()

    (WORK / "sweep").mkdir(parents=True, exist_ok=True)
    if args.jobs <= 1:
        for entry in cells:
            run_one(*entry)
        return
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda chain: [run_one(*entry) for entry in chain], chains.values()))


if __name__ == "__main__":
    run_script(main)
