"""Regenerate benchmarks/RESULTS.md (and its PNG plots) from the JSON files in benchmarks/results.

Only numbers from those files appear; a section whose JSON is missing says which script makes it.
The one outside figure, the issue's reference distiller (42.3% kNN at 120k images), is labelled as such.

Example: python benchmarks/render.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))  # the lr table reads distillctl's preset policy
# "Which method?": the measured table as package data (``distillctl methods list``) and the README section
MEASURED = REPO / "distillctl" / "methods" / "measured.json"
README = REPO / "README.md"
README_START, README_END = "<!-- which-method:start (python benchmarks/render.py) -->", "<!-- which-method:end -->"
SETUP_COMMAND = "python benchmarks/setup_data.py"
# Cells that ran before method.preset existed trained with the CLI's lr, the same for every method:
# `distillctl run` took train.lr's default 0.05 (distillctl/config.py at commit 1580ee6) and `distillctl pretrain`
# its --lr default 0.06 (distillctl/commands.py at 1580ee6). Their commands are pinned to those settings.
LEGACY_LR = {"run": 0.05, "pretrain": 0.06}
ISSUE_REFERENCE = {"images": 120_000, "knn_top1": 42.3, "random": 25.6, "teacher": 86.6,
                   "what": "independent minimal cosine-regression distiller quoted in issue 8 (not measured here)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Example: python benchmarks/render.py")
    parser.add_argument("--results", default=str(BENCH / "results"), help="Directory of the JSON results.")
    parser.add_argument("--out", default=str(BENCH / "RESULTS.md"), help="Markdown file to write.")
    parser.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    parser.add_argument("--measured", default=str(MEASURED),
                        help="Package data file for `distillctl methods list` ('' to skip).")
    parser.add_argument("--readme", default=str(README),
                        help="README whose 'Which method?' block is regenerated ('' to skip).")
    return parser.parse_args(argv)


def load(directory: Path, name: str) -> dict | None:
    try:
        return json.loads((directory / name).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def pct(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def num(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def med(s: dict | None, digits: int = 1, unit: str = "") -> str:
    """'median [min–max] (n=…)' from a spread dict."""
    if not s or s.get("median") is None:
        return "–"
    if s.get("n", 1) <= 1:
        return f"{s['median']:.{digits}f}{unit}"
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}–{s['max']:.{digits}f}] (n={s['n']})"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- quality -----------------------------------------------------------------------------------

def _verb(command: str) -> str:
    parts = command.split()
    return parts[1] if len(parts) > 1 and parts[0] == "distillctl" else ""


def _flag(command: str, flag: str) -> str | None:
    parts = command.split()
    return parts[parts.index(flag) + 1] if flag in parts[:-1] else None


def cell_lr(row: dict) -> float | None:
    """The learning rate a cell trained with: recorded, given on its command line, or (cells from before
    method.preset) the CLI default of its verb (:data:`LEGACY_LR`)."""
    if row.get("lr") is not None:
        return float(row["lr"])
    command = row.get("command") or ""
    given = _flag(command, "--lr")
    return float(given) if given else LEGACY_LR.get(_verb(command))


def label(row: dict) -> str:
    """A cell's method, with the preset it ran with when it ran under method.preset (``simreg [auto]``)."""
    return row["method"] + (f" [{row['preset']}]" if row.get("preset") else "")


def collapse_note(row: dict) -> str:
    """`` (collapsed at step N)`` when distillctl's collapse watch (methods/collapse.py) fired in the cell's run."""
    collapse = row.get("collapse")
    if not collapse:
        return ""
    recovered = collapse.get("recovered_at_step")
    return (f" (collapsed at step {collapse['step']:,}, recovered by step {recovered:,})" if recovered is not None
            else f" (collapsed at step {collapse['step']:,})")


def cell_preset(row: dict) -> str:
    command = row.get("command") or ""
    return row.get("preset") or next((p.split("=", 1)[1] for p in command.split() if p.startswith("method.preset=")),
                                     "published (before method.preset)")


def _train_images(cfg: dict | None) -> int:
    """The protocol's training-set size from a result file's config (the protocol's 10,000 where unrecorded)."""
    return int((cfg or {}).get("train_images") or 10_000)


def stale_pins(command: str, row: dict, train_images: int) -> list[str]:
    """The flags that pin a preset-era cell's command to what it ran with where this checkout's preset policy now
    derives other values (a derivation added or changed since, e.g. SMD's short-run settings): ``--set key=value``
    per such key (``--lr`` for the lr), so the command reproduces the row. Empty when nothing changed."""
    derived = row.get("derived") or {}
    if not row.get("preset") or not row.get("steps") or not row.get("method"):
        return []
    from quality import stale_values  # noqa: E402 - the same check the suite runs before reusing a finished cell
    from sweep import fmt  # noqa: E402 - values as --set text that YAML reads back unchanged

    parts = command.split()
    explicit = {}
    for i, part in enumerate(parts[:-1]):
        if part == "--set" and parts[i + 1].startswith("method.params."):
            name, _, value = parts[i + 1][len("method.params."):].partition("=")
            explicit[name] = value
    params = {**explicit, **{key.removeprefix("method.params."): (entry or {}).get("value")
                             for key, entry in derived.items() if key.startswith("method.params.")}}
    optimizer = next((p.split("=", 1)[1] for p in parts if p.startswith("train.optimizer=")), None) or "sgd"
    summary = {"recipe": {"method": {"name": row["method"], "preset": row["preset"], "params": params},
                          "train": {"max_steps": row["steps"], "batch_size": int(_flag(command, "--batch-size") or 64),
                                    "lr": row.get("lr"), "optimizer": optimizer},
                          "derived": derived},
               "data": {"images": train_images}}
    return [f"--lr {fmt(ran)}" if key == "train.lr" else f"--set {key}={fmt(ran)}"
            for key, ran, _now in stale_values(summary)]


def reproducible_command(command: str, row: dict | None = None, train_images: int = 10_000) -> str:
    """A cell's command pinned to what it ran with: cells from before method.preset get
    ``--set method.preset=published`` (the papers' values, which were the defaults then) and their verb's lr; cells
    that ran under a preset whose values this checkout derives differently get those values pinned
    (:func:`stale_pins`, given the cell's ``row`` and training-set size)."""
    threads = (row or {}).get("threads")
    if threads and command.startswith("distillctl ") and "OMP_NUM_THREADS=" not in command:
        # the weights a run trains depend on its thread count (float reduction order): the command says it
        return f"OMP_NUM_THREADS={threads} " + reproducible_command(command, {**row, "threads": None}, train_images)
    verb = _verb(command)
    # A cell that ran its teacher online is pinned `--teacher-mode online`: `auto` has since learnt to cache methods
    # that once had to run online (teacher taps for pcd and dense-reg, rotated copies for dlkd; CHANGELOG), and a
    # cache replays K stored views instead of a fresh augmentation per step.
    if row and row.get("teacher_mode") == "online" and _flag(command, "--teacher-mode") is None:
        command += " --teacher-mode online"
    if verb not in LEGACY_LR or "method.preset=" in command:
        pins = stale_pins(command, row, train_images) if row and verb in LEGACY_LR else []
        return " ".join([command, *pins])
    pinned = command + " --set method.preset=published"
    if _flag(command, "--lr") is None:
        pinned += f" --lr {LEGACY_LR[verb]:g}"
    return pinned


def lr_lines(q: dict, facts: dict) -> list[str]:
    """Per method: the lr its cells ran with, the paper's lr, and what ``method.preset=auto`` gives on this protocol."""
    try:
        from distillctl.methods.base import get_method
        from distillctl.methods.presets import RunSize, derive, method_facts, uses_short_run_lr
    except ImportError:  # render without the package: no lr table
        return []
    cfg = q["config"]
    size = RunSize(_train_images(cfg), int(cfg.get("batch_size") or 64), int(facts["budget"]))
    lines = []
    seen = {}
    for r in q.get("rows", {}).values():
        if r.get("status") == "done":
            seen.setdefault(r["method"], set()).add(cell_lr(r))
    for method in sorted(seen):
        try:
            method_facts_ = method_facts(get_method(method))
        except Exception:  # noqa: BLE001 - a method no longer registered keeps its measured lr only
            method_facts_ = None
        ran = ", ".join(f"{v:g}" for v in sorted(v for v in seen[method] if v is not None)) or "–"
        recipe = method_facts_.recipe if method_facts_ else None
        if recipe is None:
            lines.append(f"- {method}: ran at lr {ran}; no published recipe in distillctl's preset table.")
            continue
        lr_item = next((d for d in derive(method_facts_, size, "auto") if d.key == "train.lr"), None)
        auto = lr_item.value if lr_item else None
        auto_text = f"{auto:g}" if auto is not None else (lr_item.reason if lr_item else "not derived")
        if auto is not None and uses_short_run_lr(recipe, size, "auto"):
            auto_text += (f" (the measured short-run lr, for runs up to "
                          f"{int(recipe.short_run.max_share * recipe.images_seen):,} images)")
        rule = {"none": "not scaled by batch", "linear": "× batch/256-style linear rule",
                "sqrt": "square-root batch rule"}[recipe.published_rule]
        lines.append(f"- {method}: ran at lr {ran}; published {recipe.lr:g} at batch {recipe.batch} ({recipe.optimizer}, "
                     f"{rule}); `method.preset=auto` at batch {size.batch_size}: {auto_text}.")
    return lines


def table_budget(q: dict) -> int:
    """The budget of the full table: the one with the most finished supervised-teacher cells (ties: the larger)."""
    counts: dict[int, int] = {}
    for r in q.get("rows", {}).values():
        if r.get("status") == "done" and r["teacher"] in ("sup", None):
            counts[r["budget"]] = counts.get(r["budget"], 0) + 1
    if not counts:
        return q["config"]["budget_images"]
    return max(counts, key=lambda b: (counts[b], b))


def best_per_method(rows) -> list[dict]:
    """One row per method (its best kNN; ties: the first), best first: a method measured twice at one budget (the
    published preset's cell and ``auto``'s, say) is ranked and counted once."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["method"] not in best or (r.get("knn_top1") or 0) > (best[r["method"]].get("knn_top1") or 0):
            best[r["method"]] = r
    return sorted(best.values(), key=lambda r: -(r.get("knn_top1") or 0))


def quality_facts(q: dict, budget: int | None = None) -> dict:
    """Best method, its ratio to the teacher and gain over the best SSL-only student at ``budget`` (default: the
    full table's budget). The gain is only taken against SSL-only students trained for the same budget."""
    rows = [r for r in q.get("rows", {}).values() if r.get("status") == "done"]
    budget = budget or table_budget(q)
    at_budget = [r for r in rows if r["budget"] == budget]
    distill = best_per_method(r for r in at_budget if r["kind"] == "distill" and r["teacher"] == "sup")
    ssl = best_per_method(r for r in at_budget if r["kind"] == "ssl")
    teacher = (q.get("reference", {}).get("teacher_knn") or {}).get("sup")
    facts = {"budget": budget, "distill": distill, "ssl": ssl, "teacher_knn": teacher,
             "teacher_linear": (q.get("reference", {}).get("teacher_linear") or {}).get("linear_top1"),
             "random": dict(q.get("reference", {}).get("random") or {})}
    pipeline_random = (q.get("reference", {}).get("random_knn_pipeline") or {}).get(q["config"]["students"].split(",")[0])
    if facts["random"].get("knn_top1") is None and pipeline_random is not None:
        facts["random"]["knn_top1"] = pipeline_random  # the first cell's eval.random_student (same protocol)
    if distill:
        best = distill[0]
        facts["best"] = best
        facts["ratio"] = best["knn_top1"] / teacher if teacher else None
        facts["gain"] = best["knn_top1"] - ssl[0]["knn_top1"] if ssl else None
        facts["best_ssl"] = ssl[0] if ssl else None
    budgets = sorted({r["budget"] for r in rows if r["kind"] == "distill" and r["teacher"] == "sup"})
    facts["long"] = {b: quality_facts_at(q, b) for b in budgets if b != budget}
    return facts


def quality_facts_at(q: dict, budget: int) -> dict:
    """The distillation rows at another budget, best first (no recursion into further budgets)."""
    rows = [r for r in q.get("rows", {}).values() if r.get("status") == "done" and r["budget"] == budget]
    return {"distill": sorted((r for r in rows if r["kind"] == "distill" and r["teacher"] == "sup"),
                              key=lambda r: -(r.get("knn_top1") or 0)),
            "ssl": sorted((r for r in rows if r["kind"] == "ssl"), key=lambda r: -(r.get("knn_top1") or 0))}


CURVE_TARGET = 500_000  # issue 8: the best three methods' curves reach at least this many images seen
CURVE_TARGET_16 = 1_000_000  # issue 16: "the curves to 1,000,000 for the best three"


def suite_minutes(q: dict) -> float | None:
    """Minutes the suite ran: its invocations' running times summed (``elapsed_s``), pauses between them excluded."""
    return (q.get("elapsed_s") or 0) / 60 if q.get("elapsed_s") is not None else calendar_minutes(q)


def calendar_minutes(q: dict) -> float | None:
    """Wall-clock minutes from the suite's first start to its last write (pauses between invocations included)."""
    import datetime as dt

    try:
        start = dt.datetime.strptime(q["started_utc"], "%Y-%m-%dT%H:%M:%SZ")
        end = dt.datetime.strptime(q["finished_utc"], "%Y-%m-%dT%H:%M:%SZ")
    except (KeyError, TypeError, ValueError):
        return None
    return (end - start).total_seconds() / 60


def quality_section(q: dict | None, plots: list[str]) -> tuple[str, dict]:
    if not q:
        return "## Quality\n\nNo results yet: run `python benchmarks/quality.py`.\n", {}
    facts = quality_facts(q)
    cfg = q["config"]
    teacher = facts["teacher_knn"]
    best_ssl = facts.get("best_ssl")
    out = ["## Quality (CIFAR-10, 64 px, real data)", ""]
    budget = facts["budget"]
    per_budget: dict[int, set] = {}
    for r in q.get("rows", {}).values():
        if r.get("status") == "done" and r["teacher"] in ("sup", None):
            per_budget.setdefault(r["budget"], set()).add(r["method"])
    out.append(f"Student `{cfg['students']}`; the full table is at **{budget:,} images seen** per cell"
               + "".join(f"; {', '.join(sorted(per_budget[b]))} also at **{b:,}**" for b in sorted(per_budget)
                         if b != budget) +
               f" (batch {cfg['batch_size']}, `train.max_steps` = budget / batch, cosine schedule over "
               f"⌈steps / steps-per-epoch⌉ epochs, the lr in the lr column), seed {cfg['seed']}, {cfg['image_size']} px (32 px JPEGs upsampled, crop_pct 1.0), "
               f"feature cache with K = {cfg['cache_views']} stored views per image where the method allows it. "
               f"Train subset `{cfg['data']['train']}`: {cfg['train_images']:,} images (1 000 per class, seeded); "
               f"kNN bank = that subset; queries `{cfg['data']['test']}`: {cfg['test_images']:,} test images "
               f"(200 per class). kNN: cosine, weighted, k = 20, T = 0.07. Linear: the product's probe "
               f"(lr × weight-decay sweep on a 10% held-out part of the train subset, then retrained).")
    long_enough = sorted({m for b, ms in per_budget.items() if b >= ISSUE_REFERENCE["images"] for m in ms})
    if budget < ISSUE_REFERENCE["images"]:
        out.append(f"\n**Reduced configuration.** The issue asks for every method at ≥ {ISSUE_REFERENCE['images']:,} "
                   f"images; this run has the full table at {budget:,} and "
                   f"{', '.join(long_enough) if long_enough else 'no method'} at ≥ {ISSUE_REFERENCE['images']:,}, to fit "
                   f"the session's time on {(q.get('machine') or {}).get('cores')} CPU cores (see the suite time "
                   f"below); `python benchmarks/quality.py --curve` runs the full configuration (resumable).")
    top3 = [r["method"] for r in facts["distill"][:3]]
    if top3:
        points = {m: sorted({r["budget"] for r in q.get("rows", {}).values() if r.get("status") == "done"
                             and r["method"] == m and r["kind"] == "distill" and r["teacher"] == "sup"}) for m in top3}
        short = {target: [m for m in top3 if points[m][-1] < target] for target in (CURVE_TARGET, CURVE_TARGET_16)}
        out.append(f"\n**Curves** (the best three methods up to ≥ {CURVE_TARGET:,} images for issue 8 and to "
                   f"{CURVE_TARGET_16:,} for issue 16; best three at {budget:,}): "
                   + "; ".join(f"{m} at {', '.join(f'{b:,}' for b in points[m])}" for m in top3) + " — "
                   + "; ".join(f"{', '.join(short[t])} not yet at {t:,}" if short[t] else f"every one reaches {t:,}"
                               for t in (CURVE_TARGET, CURVE_TARGET_16)) + ".")
    # the dense-probe columns appear once a cell has one (`quality.py --dense`)
    with_dense = any((r.get("dense") or {}) for r in q.get("rows", {}).values())
    dn = (lambda r: dense_cols(r)) if with_dense else (lambda r: [])  # noqa: E731
    header = ["row", "kind", "teacher", "images seen", "lr", "kNN top-1 %", "linear top-1 %",
              *(["dense mIoU %", "dense pixel acc %"] if with_dense else []), "kNN student/teacher",
              "kNN gain vs best SSL-only (pts)", "train wall s", "img/s", "teacher mode"]
    rows = []
    rows.append([f"teacher ResNet-18 (supervised, {cfg['teacher']['file']})", "teacher", "–", "–", "–", pct(teacher),
                 pct(facts["teacher_linear"]), *dn(None), "1.00", "–", "–", "–", "–"])
    rnd = facts["random"]
    rows.append([f"random-init {cfg['students']}", "floor", "–", "0", "–", pct(rnd.get("knn_top1")),
                 pct(rnd.get("linear_top1")), *dn(None), num(rnd["knn_top1"] / teacher, 2) if teacher and rnd.get("knn_top1") else "–",
                 num(rnd["knn_top1"] - best_ssl["knn_top1"], 1) if best_ssl and rnd.get("knn_top1") else "–",
                 "–", "–", "–"])
    all_rows = sorted(q.get("rows", {}).values(), key=lambda r: (r["teacher"] != "sup" and r["teacher"] is not None,
                                                                  -r["budget"], r["kind"] != "distill",
                                                                  -(r.get("knn_top1") or -1)))
    for r in all_rows:
        own_ssl = row_ssl_teacher(r, q)
        teacher_knn = teacher if r["teacher"] == "sup" else own_ssl.get("knn_top1")
        if r.get("status") != "done":
            rows.append([f"{label(r)} ({r['status']})", r["kind"], r["teacher"] or "–", f"{r['budget']:,}", "–",
                         "–", "–", *dn(None), "–", "–", "–", "–", (r.get("error") or "")[:80].replace("|", "/")])
            continue
        ratio = r["knn_top1"] / teacher_knn if teacher_knn and r["kind"] == "distill" else None
        gain = None
        same = sorted((s for s in q.get("rows", {}).values() if s.get("status") == "done" and s["kind"] == "ssl"
                       and s["budget"] == r["budget"]), key=lambda s: -(s.get("knn_top1") or 0))
        if same and r["kind"] == "distill":
            gain = r["knn_top1"] - same[0]["knn_top1"]
        rows.append([label(r) + collapse_note(r), r["kind"],
                     {"sup": "ResNet-18 sup.", "ssl": ssl_teacher_label(own_ssl)}.get(r["teacher"], "–"),
                     f"{r['budget']:,}", num(cell_lr(r), 4).rstrip("0").rstrip(".") if cell_lr(r) else "–",
                     pct(r["knn_top1"]), pct(r.get("linear_top1")), *dn(r), num(ratio, 2) if ratio else "–",
                     (f"{gain:+.1f}" if gain is not None else "–"),
                     ("≈" if r.get("train_wall_estimated") else "") + num(r.get("train_wall_s"), 0),
                     num(r.get("images_per_sec"), 0), r.get("teacher_mode") or "none"])
    have = {(r["method"], r["kind"]) for r in all_rows if r["budget"] == budget and r.get("status") == "done"}
    for m in cfg.get("registered_methods") or []:
        if (m["name"], m["kind"]) in have:
            continue
        why = ("not run: needs two or more teachers; the suite has one" if m.get("teachers") == "2+"
               else "not run: the suite was stopped before this cell")
        rows.append([m["name"], m["kind"], "–", f"{budget:,}", "–", "–", "–", *dn(None), "–", "–", "–", "–", why])
    for ssl_teacher in ssl_teachers(q.get("reference", {})):
        rows.append([f"SSL teacher: `distillctl pretrain --method {ssl_teacher['method']} --arch {ssl_teacher['student']}`",
                     "teacher", "–", f"{ssl_teacher['budget']:,}", num(cell_lr(ssl_teacher), 4).rstrip("0").rstrip(".")
                     if cell_lr(ssl_teacher) else "–", pct(ssl_teacher.get("knn_top1")),
                     pct(ssl_teacher.get("linear_top1")), *dn(ssl_teacher), "–", "–", num(ssl_teacher.get("train_wall_s"), 0),
                     num(ssl_teacher.get("images_per_sec"), 0), "none"])
    out += ["", table(header, rows), ""]
    out.append("\"gain vs best SSL-only\" compares with the best SSL-only student (`distillctl pretrain`) trained for "
               "the same budget (– where none was); \"student/teacher\" divides by the kNN of the teacher the row "
               "distilled from. \"train wall s\" (all invocations of a resumed cell; ≈: summed from its metrics.jsonl "
               "because it was resumed from a checkpoint older than distillctl's total_wall_s) and \"img/s\" (last "
               "invocation) are the distill stage's own; cells ran as the suite's command says (two one-thread "
               "cells at a time on the two cores, so img/s is per core). \"lr\": the learning rate the cell trained "
               "with; cells run before `method.preset` existed used the CLI's default for every method (run "
               f"{LEGACY_LR['run']:g}, pretrain {LEGACY_LR['pretrain']:g}) with the papers' other values "
               "(`method.preset=published`).")
    lrs = lr_lines(q, facts)
    if lrs:
        out += ["", "**Learning rates** (ran at: the cells above; published: the paper's lr at its batch, as "
                    "`distillctl methods show` lists it; auto: what the default `method.preset=auto` derives for this "
                    "protocol):", "", *lrs]
    if "curve" in plots:
        out += ["", "![kNN top-1 vs images seen](quality_budget.png)", ""]
    if q.get("reference", {}).get("error"):
        out.append(f"\nReference rows failed: {q['reference']['error']}")
    out += ["", f"Suite running time: {num(suite_minutes(q), 1)} min, summed over its invocations (resumes included, "
                f"pauses between invocations excluded; invocations killed before the suite had a one-minute heartbeat "
                f"lost their time since their last result). Calendar span: {num(calendar_minutes(q), 1)} min "
                f"(started {q.get('started_utc')}, last write {q.get('finished_utc')}).", "",
            "<details><summary>Exact commands</summary>", "",
            f"Set-up, once, from a fresh clone with the shared folder beside it (../shared): `pip install -e .` and "
            f"`{SETUP_COMMAND}` (unpacks ../shared/data/cifar10-jpeg.tar.gz into the protocol subsets in "
            "benchmarks/work/ and saves the seeded random-init reference student). Then every command below runs as "
            "written from the repository root, in order (the SSL-teacher cell reads the teacher that the SSL-teacher "
            "`distillctl pretrain` line trains). The suite "
            "commands (`python benchmarks/quality.py …`) ran before `method.preset` existed: run today they use the "
            "default `--preset auto` and so re-measure; the per-cell commands are pinned (`--set "
            "method.preset=published` and the lr they ran with, and `--teacher-mode online` where a cell ran its "
            "teacher online, since `auto` now serves some of those methods from the feature cache) and reproduce the "
            "rows.", "",
            "```", q.get("command", ""), *q.get("extra_commands", [])]
    images = _train_images(cfg)
    for ssl_teacher in ssl_teachers(q.get("reference", {})):  # make the teacher files the SSL-teacher cells read
        if ssl_teacher.get("command"):
            out.append(reproducible_command(ssl_teacher["command"], ssl_teacher, images))
    for r in all_rows:
        out.append(reproducible_command(r.get("command", ""), r, images))
    for key in ("teacher_linear",):
        if q.get("reference", {}).get(key, {}).get("command"):
            out.append(q["reference"][key]["command"])
    for key in ("knn_command", "linear_command"):
        if rnd.get(key):
            out.append(rnd[key])
    out += ["```", "", "</details>", ""]
    return "\n".join(out), facts


# --- dense features (issue 14) ----------------------------------------------------------------------

DENSE_RESULTS = "quality_dense.json"


def dense_cols(row: dict | None) -> list[str]:
    """The dense-probe columns of a row: mIoU %, pixel accuracy % ("failed" where the probe failed, – where none ran)."""
    dense = (row or {}).get("dense") or {}
    if dense.get("error"):
        return ["failed", "failed"]
    return [pct(dense.get("miou")), pct(dense.get("pixel_accuracy"))]


def dense_task(cfg: dict) -> str:
    """How the dense probe's task is built and scored (enough to reproduce it without reading the code)."""
    probe = cfg.get("dense_probe") or {}
    size = cfg.get("image_size", 64)
    return (f"**Dense task** (`distillctl eval dense`, task `mosaic-2x2`, distillctl/eval/dense.py): each image is "
            f"reduced to its centre view at {size} px (crop_pct 1.0, the kNN transform); four views are tiled 2×2 into a "
            f"{2 * size} × {2 * size} mosaic and every pixel is labelled with the class of its quadrant. Images come from "
            f"seeded permutations of the split (seed {cfg.get('seed', 0)} for train, seed + 1 for test): "
            f"{probe.get('mosaics', 1000):,} train mosaics from `{cfg['data']['train']}`, {probe.get('val_mosaics', 500):,} "
            f"test mosaics from `{cfg['data']['test']}`. Features: the frozen last-stage map of the mosaic (CNN: "
            "`forward_features`; ViT: patch tokens after the final norm on their grid, CLS dropped, position embeddings "
            "resampled once for the mosaic size), standardised per channel. Probe: one linear layer shared by all "
            "locations (a 1×1 convolution) on one label per feature cell (the quadrant holding the cell's centre), SGD "
            f"with momentum 0.9, cosine schedule, {probe.get('epochs', 20)} epochs, lr ∈ {{0.01, 0.1, 1}} × weight decay "
            "∈ {0, 1e-4, 1e-3} chosen on the last 10% of the train mosaics, then retrained on all of them. Scores: test "
            "logits upsampled bilinearly to the mosaic's pixels; pixel accuracy and mIoU (mean over classes with a "
            "non-empty union). A map of g × g cells can only place quadrant borders at its cell edges, so the grid "
            "(column \"grid\") bounds what a probe can reach at the borders.")


def _teacher_label(row: dict, cfg: dict) -> str:
    if row.get("teacher") == "sup":
        return "ResNet-18 sup."
    if row.get("teacher") == "vit":
        method, _, rest = (cfg.get("vit_teacher") or "").partition(":")
        rebuild = row.get("vit_teacher_rebuild")
        if row.get("vit_teacher_spec"):
            return f"ViT teacher ({row['vit_teacher_spec']})"
        return f"ViT teacher ({method}{f', rebuild {rebuild}' if rebuild else ''})"
    return "–"


def _grid(row: dict | None) -> str:
    grid = ((row or {}).get("dense") or {}).get("feature_grid")
    return f"{grid[0]}×{grid[1]}" if grid else "–"


def _other_budgets(d: dict) -> str:
    """" (also …)" when merged dense runs hold cells at budgets other than the suite's own."""
    budgets = sorted({r["budget"] for r in (d.get("rows") or {}).values()} - {d["config"]["budget_images"]})
    if not budgets:
        return ""
    return f" (also {', '.join(f'{b:,}' for b in budgets)}: see the column \"images seen\")"


def dense_section(d: dict | None) -> str:
    """The issue-14 table: ViT and dense-distillation cells with kNN, linear and the dense probe, beside the
    teacher(s), the random-init students and the best global method."""
    title = "## Dense features: ViT students and dense distillation (issue 14)"
    if not d:
        return (f"{title}\n\nNo results yet: run `{SETUP_COMMAND}` and then `python benchmarks/quality.py --suite dense` "
                "(resumable; `--dry-run` prints every command with a time estimate).\n")
    cfg, ref = d["config"], d.get("reference") or {}
    out = [title, "", f"CIFAR-10 protocol of the table above: `{cfg['data']['train']}` ({cfg['train_images']:,} images) "
                      f"for training, kNN bank and probes, `{cfg['data']['test']}` ({cfg['test_images']:,}) for scores, "
                      f"{cfg['image_size']} px, batch {cfg['batch_size']}, seed {cfg['seed']}, "
                      f"{cfg['budget_images']:,} images seen per distillation cell{_other_budgets(d)}. CNN student `{cfg.get('cnn_student')}`; "
                      f"ViT student `{cfg.get('vit_student')}` (AdamW, lr {cfg.get('vit_lr')}, weight decay 0.05); ViT "
                      f"teacher pretrained here: `{cfg.get('vit_teacher')}` (METHOD:ARCH:IMAGES, same optimizer). "
                      "kNN and linear as in the table above.", "", dense_task(cfg), ""]
    header = ["row", "student", "teacher", "images seen", "kNN top-1 %", "linear top-1 %", "dense mIoU %",
              "dense pixel acc %", "grid", "train wall s", "img/s"]
    rows = []
    teacher = ref.get("teacher") or {}
    rows.append([f"teacher ResNet-18 (supervised, {cfg['teacher']['file']})", "–", "–", "–", pct(teacher.get("knn_top1")),
                 pct(teacher.get("linear_top1")), *dense_cols(teacher), _grid(teacher), "–", "–"])
    vit = ref.get("vit_teacher")
    if vit:
        rows.append([f"ViT teacher: `distillctl pretrain --method {vit['method']}`", f"`{vit['student']}`", "–",
                     f"{vit['budget']:,}", pct(vit.get("knn_top1")), pct(vit.get("linear_top1")), *dense_cols(vit),
                     _grid(vit), num(vit.get("train_wall_s"), 0), num(vit.get("images_per_sec"), 0)])
    for again in ref.get("vit_teacher_rebuilds") or []:
        threads = f", {again['threads']} thread(s)" if again.get("threads") else ""
        # another spec is a ViT pretrained by another run of the suite: pretraining the ViT student's own
        # architecture is the SSL-only baseline; another architecture is a different teacher, named by its spec
        name = (f"ViT teacher, rebuild {again['number']}" if again.get("number")
                else "SSL-only ViT (pretrain, no teacher)" if again.get("student") == cfg.get("vit_student")
                else f"another ViT teacher ({_spec(again)})")
        rows.append([f"{name} (`{again.get('file')}`{threads}): `distillctl pretrain --method "
                     f"{again['method']}`", f"`{again['student']}`", "–", f"{again['budget']:,}",
                     pct(again.get("knn_top1")), pct(again.get("linear_top1")), *dense_cols(again), _grid(again),
                     num(again.get("train_wall_s"), 0), num(again.get("images_per_sec"), 0)])
    if not vit and ref.get("vit_teacher_error"):
        rows.append(["ViT teacher (failed)", "–", "–", "–", "–", "–", "–", "–", "–", "–",
                     ref["vit_teacher_error"][:80].replace("|", "/")])
    for name, row in sorted(ref.items()):
        if name.startswith("random:"):
            rows.append([f"random-init `{name.split(':', 1)[1]}`", "floor", "–", "0", pct(row.get("knn_top1")),
                         pct(row.get("linear_top1")), *dense_cols(row), _grid(row), "–", "–"])
    cells = sorted(d.get("rows", {}).values(), key=lambda r: (r["student"] != cfg.get("cnn_student"), r["teacher"] != "sup",
                                                              -((r.get("dense") or {}).get("miou") or -1)))
    for r in cells:
        student = f"`{r['student']}`"
        if r.get("status") != "done":
            rows.append([f"{label(r)} ({r.get('status')})", student, _teacher_label(r, cfg), f"{r['budget']:,}", "–", "–",
                         "–", "–", "–", "–", (r.get("error") or "")[:80].replace("|", "/")])
            continue
        rows.append([label(r) + (" (best global method)" if r.get("role") == "reference" else ""), student,
                     _teacher_label(r, cfg), f"{r['budget']:,}", pct(r.get("knn_top1")), pct(r.get("linear_top1")),
                     *dense_cols(r), _grid(r), ("≈" if r.get("train_wall_estimated") else "") + num(r.get("train_wall_s"), 0),
                     num(r.get("images_per_sec"), 0)])
    out += [table(header, rows), ""]
    if cfg.get("vit_teacher") and not any(r.get("teacher") == "vit" for r in cells):
        out += [f"Not run yet: the ViT teacher `{cfg['vit_teacher']}` (`distillctl pretrain`, rebuilt by the suite) and "
                "the cells distilled from it (AttnDistill and MAE-lite by default); the suite command below resumes "
                "them and skips every finished cell.", ""]
    failed = [r for r in cells if ((r.get("dense") or {}).get("error"))]
    for r in failed:
        out.append(f"- dense probe of {label(r)} failed: {r['dense']['error']}")
    out += [f"Suite running time: {num(suite_minutes(d), 1)} min summed over its invocations.", "",
            "<details><summary>Exact commands (dense features)</summary>", "",
            f"Set-up as above (`{SETUP_COMMAND}`), and `{cfg.get('setup_command') or SETUP_COMMAND}` (the random-init "
            "students the reference rows evaluate). The suite command runs everything below in this order (resumable; "
            "finished cells and probes are kept); the ViT teacher's `distillctl pretrain` line makes the teacher file "
            "that the ViT-teacher cells read, and every cell's `distillctl eval dense` line reads that cell's run "
            "directory.", "", "```", d.get("command", ""), *[c for c in d.get("extra_commands") or [] if c]]
    commands = []
    rebuilds = list(ref.get("vit_teacher_rebuilds") or [])
    for r in [r for r in cells if r["teacher"] == "sup"] + ([vit] if vit else []) + rebuilds + [r for r in cells if r["teacher"] == "vit"]:
        commands += [reproducible_command(r.get("command") or "", r, _train_images(cfg)),
                     (r.get("dense") or {}).get("command")]
    for name, row in sorted(ref.items()):
        if isinstance(row, dict) and (name == "teacher" or name.startswith("random:")):
            commands += [row.get("knn_command"), row.get("linear_command"), (row.get("dense") or {}).get("command")]
    out += [c for c in commands if c] + ["```", "", "</details>", ""]
    return "\n".join(out)


def dense_note(d: dict | None) -> str | None:
    """One closing-note line: the dense probe of each cell against the random-init student of its family."""
    if not d:
        return None
    done = [r for r in (d.get("rows") or {}).values() if r.get("status") == "done" and (r.get("dense") or {}).get("miou") is not None]
    if not done:
        return None
    floors = {k.split(":", 1)[1]: v.get("dense", {}).get("miou") for k, v in (d.get("reference") or {}).items()
              if k.startswith("random:") and isinstance(v, dict) and v.get("dense")}
    parts = [f"{label(r)} on {r['student']} {r['dense']['miou']:.1f}"
             + (f" (random-init {floors[r['student']]:.1f})" if floors.get(r["student"]) is not None else "")
             for r in sorted(done, key=lambda r: -r["dense"]["miou"])]
    return f"- Dense probe mIoU % (mosaic-2x2, {d['config']['budget_images']:,} images per cell): " + "; ".join(parts) + "."


# --- what moves the weak methods (issue 16 §2, benchmarks/sweep.py) ----------------------------------------

SWEEP_RESULTS = "sweep.json"
SWEEP_TITLE = "## What moves the weak methods (issue 16 §2)"


def weak_methods(q: dict | None) -> tuple[list[dict], dict]:
    """The table's distillation cells below the random-init student or below the best SSL-only student at the full
    table's budget (weakest first), and the facts they were judged by."""
    if not q:
        return [], {}
    facts = quality_facts(q)
    floor = (facts.get("random") or {}).get("knn_top1")
    ssl = (facts.get("best_ssl") or {}).get("knn_top1")
    bar = max(v for v in (floor, ssl, float("-inf")) if v is not None)
    weak = [r for r in facts["distill"] if r.get("knn_top1") is not None and r["knn_top1"] < bar]
    return sorted(weak, key=lambda r: (r["knn_top1"], r["method"])), facts


def sweep_command(methods: list[str], budget: int) -> str:
    """The sweep that has not run yet: the derived factors plus the issue's lr and temperature suspects."""
    extra = "" if budget == 30_000 else f" --budget-images {budget}"
    return f"python benchmarks/sweep.py --methods {','.join(methods)}{extra} --suspects --jobs 2 --threads 1"


def _factor_text(row: dict) -> str:
    """``queue_size = 8192 (its auto value)`` / ``train.lr = 0.01``: what a one-factor variant changed."""
    (key, value), = row["factors"].items()
    source = " (its auto value)" if row.get("source") == "auto" else ""
    return f"{key.removeprefix('method.params.')} = {value:g}{source}" if isinstance(value, (int, float)) \
        else f"{key.removeprefix('method.params.')} = {value}{source}"


def sweep_verdict(rows: list[dict], floor: float | None) -> str:
    """One sentence from the measured rows: the one-factor variant with the largest kNN gain over ``published``, and
    what ``auto`` (every derived value together) gained."""
    by_name = {r["variant"]: r for r in rows if r.get("status") == "done"}
    published = by_name.get("published")
    auto = by_name.get("auto")
    left_out = sorted((r for r in by_name.values() if r.get("source") == "leave-one-out" and r.get("knn_top1") is not None),
                      key=lambda r: (r["knn_top1"], r["variant"]))
    leave_one_out = ""
    if auto is not None and auto.get("knn_top1") is not None and left_out:
        leave_one_out = (f"`auto` with one derived value back at the paper's ({auto['knn_top1']:.1f} % with all): "
                         + ", ".join(f"without {r['variant'].removeprefix('auto-')} "
                                     f"{r['knn_top1'] - auto['knn_top1']:+.1f}" for r in left_out) + ".")
    if published is None or published.get("knn_top1") is None:
        return " ".join(["No one-factor verdict yet: the `published` cell has not run.", leave_one_out]).strip()
    base = published["knn_top1"]
    single = [r for r in by_name.values() if len(r.get("factors") or {}) == 1 and r.get("knn_top1") is not None]
    parts = []
    if single:
        best = max(single, key=lambda r: (r["knn_top1"], r["variant"]))
        gain = best["knn_top1"] - base
        versus = f", {best['knn_top1'] - floor:+.1f} vs random-init" if floor is not None else ""
        if gain > 0:
            parts.append(f"Largest gain over `published` ({base:.1f} %): **{_factor_text(best)}**, "
                         f"{gain:+.1f} points kNN (→ {best['knn_top1']:.1f} %{versus}).")
        else:
            parts.append(f"No single factor beats `published` ({base:.1f} %); the best, {_factor_text(best)}, "
                         f"gives {gain:+.1f} points.")
    if auto is not None and auto.get("knn_top1") is not None and len(auto.get("factors") or {}) > 1:
        parts.append(f"`auto` (all {len(auto['factors'])} derived values together): "
                     f"{auto['knn_top1'] - base:+.1f} points.")
    if leave_one_out:
        parts.append(leave_one_out)
    if not single and not parts:
        return "No verdict yet: no variant besides `published` has run."
    return " ".join(parts)


def diverged(row: dict) -> bool:
    """A cell that stopped on distillctl's non-finite-loss guard: a measured outcome of its settings, not a
    failure to rerun."""
    return row.get("status") != "done" and "non-finite loss" in (row.get("error") or "")


def _delta(value: float | None, base: float | None) -> str:
    return f"{value - base:+.1f}" if value is not None and base is not None else "–"


def table_as_published(plan: dict, rows: list[dict], table_rows: list[dict]) -> dict | None:
    """The quality table's finished cell standing in for a ``published`` variant that has not run, where it ran the
    same values: the plan has no ``auto`` variant (``auto`` derives the paper's values for this run, its lr
    included, so the table's ``auto`` cell is ``published``); None otherwise."""
    order = [v["name"] for v in plan.get("variants") or []]
    if "published" not in order or "auto" in order or any(r.get("variant") == "published" for r in rows):
        return None
    for t in table_rows:
        if t.get("status") == "done" and t.get("knn_top1") is not None and cell_preset(t) in ("auto", "published"):
            return {**t, "variant": "published", "factors": {}, "overrides": [], "source": "published",
                    "reused": t.get("id"), "table_cell": True}
    return None


def sweep_group(plan: dict, rows: list[dict], table_rows: list[dict], floor: float | None) -> list[str]:
    """One method's table (plan order, then any further rows), the quality table's own cell as context (or as the
    ``published`` row where it ran the published values: :func:`table_as_published`), the verdict and the variants
    still to run."""
    order = [v["name"] for v in plan.get("variants") or []]
    stand_in = table_as_published(plan, rows, table_rows)
    rows = rows + [stand_in] if stand_in else rows
    by_name = {r["variant"]: r for r in rows}
    # a row recorded under an older grid name counts for the plan's variant of the same preset and overrides
    by_settings = {(r.get("preset"), tuple(sorted(r.get("overrides") or []))): r for r in rows}
    for variant in plan.get("variants") or []:
        same = by_settings.get((variant.get("preset"), tuple(sorted(variant.get("sets") or []))))
        if variant["name"] not in by_name and same is not None and same["variant"] not in order:
            renamed = {**same, "variant": f"{variant['name']} (run as {same['variant']})"}
            by_name[variant["name"]] = renamed
            rows = [renamed if r is same else r for r in rows]
    listed = [by_name[n] for n in order if n in by_name]
    named = listed + sorted((r for r in rows if all(r is not x for x in listed)), key=lambda r: r["variant"])
    published = (by_name.get("published") or {}).get("knn_top1") if (by_name.get("published") or {}).get(
        "status") == "done" else None
    out = [f"### {plan['method']}, {plan['budget']:,} images", "",
           "| variant | method.preset | overrides | lr | kNN top-1 % | linear top-1 % | Δ kNN vs published | "
           "Δ kNN vs random-init | train wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in named:
        overrides = ", ".join(f"`{item}`" for item in r.get("overrides") or []) or "–"
        if r.get("status") != "done":
            error = (r.get("error") or "").split("error: ", 1)[-1]
            lr = r.get("lr") or (r.get("factors") or {}).get("train.lr")  # no summary: the lr it was given, if any
            out.append(f"| {r['variant']} ({'diverged' if diverged(r) else 'failed'}) | {r.get('preset')} | "
                       f"{overrides} | {num(lr, 5).rstrip('0').rstrip('.') if lr else '–'} | – | – | – | – | "
                       f"{error[:80].replace('|', '/')} |")
            continue
        derived = "; ".join(f"{k.removeprefix('method.params.')} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}"
                            for k, v in sorted((r.get("factors") or {}).items())) if r["variant"] == "auto" else ""
        knn = r.get("knn_top1")
        if r.get("table_cell"):
            derived = "the quality table's cell: auto derives the published values here"
        out.append(f"| {r['variant']}{' (' + derived + ')' if derived else ''} | {r.get('preset')} | {overrides} | "
                   f"{num(cell_lr(r), 5).rstrip('0').rstrip('.') if cell_lr(r) else '–'} | {pct(knn)} | "
                   f"{pct(r.get('linear_top1'))} | "
                   f"{'0.0' if r['variant'] == 'published' and knn is not None else _delta(knn, published)} | "
                   f"{_delta(knn, floor)} | {num(r.get('train_wall_s'), 0)} |")
    reused = {r.get("reused") for r in rows}
    for t in table_rows:
        if t.get("id") in reused:
            continue
        out.append(f"| the quality table's cell (context, not a sweep variant) | {cell_preset(t)} | – | "
                   f"{num(cell_lr(t), 5).rstrip('0').rstrip('.') if cell_lr(t) else '–'} | {pct(t.get('knn_top1'))} | "
                   f"{pct(t.get('linear_top1'))} | {_delta(t.get('knn_top1'), published)} | "
                   f"{_delta(t.get('knn_top1'), floor)} | {num(t.get('train_wall_s'), 0)} |")
    out += ["", sweep_verdict(named, floor)]
    missing = [n for n in order if n not in by_name]
    failed = [r["variant"] for r in named if r.get("status") != "done" and not diverged(r)]
    gone = [r["variant"] for r in named if r.get("status") != "done" and diverged(r)]
    if gone:
        out.append(f"\nDiverged (the loss became non-finite; a rerun diverges again, this is the result): "
                   f"{', '.join(gone)}.")
    if missing or failed:
        todo = "; ".join(part for part in (f"not run yet: {', '.join(missing)}" if missing else "",
                                           f"failed: {', '.join(failed)}" if failed else "") if part)
        out.append(f"\n{todo[0].upper()}{todo[1:]} — `{plan['command']}` runs them (resumable; finished cells are "
                   "kept).")
    return out + [""]


def sweep_section(sw: dict | None, q: dict | None) -> str:
    """Per swept method: every variant's kNN against `published` and the random-init student, one computed verdict
    sentence, and the weak methods of the table that no sweep covers yet (with the command that sweeps them)."""
    weak, facts = weak_methods(q)
    floor = (facts.get("random") or {}).get("knn_top1")
    ssl = facts.get("best_ssl")
    out = [SWEEP_TITLE, "",
           "One factor at a time (`benchmarks/sweep.py`), on the quality protocol above (same data, student, teacher, "
           "batch, seed and evaluation): per method, `published` (`method.preset=published`: every value as the paper, "
           "lr included), `auto` (every value the default `method.preset=auto` derives for this run; the derived values "
           "in brackets) and `published` with one derived key at its `auto` value (`+key`); `key=value` rows are further "
           "one-factor points of `published` (`--grid`, `--suspects`: the lr at ⅓× and 3×, each temperature at ½× and "
           "2×). Δ vs random-init: against the random-init student of the table above "
           f"({pct(floor)} %). The verdict sentence is computed from the rows.", ""]
    plans = dict((sw or {}).get("plans") or {})
    rows = list(((sw or {}).get("rows") or {}).values())
    table = [r for r in (q or {}).get("rows", {}).values() if r.get("status") == "done" and r["kind"] == "distill"
             and r["teacher"] == "sup"]
    for key in sorted(plans, key=lambda k: (plans[k]["method"], plans[k]["budget"])):
        plan = plans[key]
        mine = [r for r in rows if r.get("method") == plan["method"] and r.get("budget") == plan["budget"]]
        context = [t for t in table if t["method"] == plan["method"] and t["budget"] == plan["budget"]]
        out += sweep_group(plan, mine, context, floor)
    swept = {(p["method"], p["budget"]) for p in plans.values()}
    todo = [r for r in weak if (r["method"], r["budget"]) not in swept]
    if todo:
        bar = " or ".join(([f"the random-init student ({pct(floor)} %)"] if floor is not None else [])
                          + ([f"the best SSL-only student ({ssl['method']} {pct(ssl['knn_top1'])} %)"] if ssl else []))
        budget = todo[0]["budget"]
        out += [f"Not swept yet, below {bar} at {budget:,} images in the table above: "
                + ", ".join(f"{r['method']} ({pct(r['knn_top1'])} %)" for r in todo) + ". Command: "
                f"`{sweep_command(sorted({r['method'] for r in todo}), budget)}` (`--dry-run` prints every cell and "
                "a time estimate).", ""]
    elif not plans:
        out += ["No sweep has run yet: `python benchmarks/sweep.py --methods METHOD --suspects` (`--dry-run` prints "
                "every cell and a time estimate).", ""]
    if sw and rows:
        out += sweep_commands(sw, "sweeps", f"Set-up as for the table (`{SETUP_COMMAND}`). The sweep commands run "
                              "every cell below (resumable); a row marked as reused is the quality table's own "
                              "finished cell with the same settings.")
    return "\n".join(out)


def sweep_commands(sw: dict, title: str, intro: str) -> list[str]:
    """A sweep file's folded block of commands: its invocations, then every cell's own command (pinned as run)."""
    out = [f"<details><summary>Exact commands ({title})</summary>", "", intro, "", "```", *(sw.get("commands") or [])]
    for key in sorted((sw.get("rows") or {})):
        row = sw["rows"][key]
        if row.get("command"):
            out.append(reproducible_command(row["command"], row, _train_images(sw.get("config"))))
    return out + ["```", "", "</details>", ""]


SWEEP_SSL_RESULTS = "sweep_ssl_teacher.json"
SWEEP_SSL_TITLE = "## What moves distillation from the SSL teacher (issue 16 §4)"


def ssl_sweep_rows(sw: dict | None, q: dict | None) -> list[tuple[dict, list[dict], list[dict]]]:
    """Per plan of the SSL-teacher sweep: the plan, its sweep rows and the quality table's SSL-teacher cells of the
    same method and budget (context, or the ``published`` stand-in)."""
    plans = (sw or {}).get("plans") or {}
    rows = list(((sw or {}).get("rows") or {}).values())
    table = [r for r in (q or {}).get("rows", {}).values() if r.get("status") == "done" and r.get("kind") == "distill"
             and r.get("teacher") == "ssl"]
    out = []
    for key in sorted(plans, key=lambda k: (plans[k]["method"], plans[k]["budget"])):
        plan = plans[key]
        out.append((plan, [r for r in rows if r.get("method") == plan["method"] and r.get("budget") == plan["budget"]],
                    [t for t in table if t["method"] == plan["method"] and t["budget"] == plan["budget"]]))
    return out


def ssl_sweep_done(plan: dict, rows: list[dict], table: list[dict]) -> list[dict]:
    """One SSL-teacher plan's finished variants with a kNN (the ``published`` stand-in included), best first."""
    stand_in = table_as_published(plan, rows, table)
    return sorted((r for r in rows + ([stand_in] if stand_in else []) if r.get("status") == "done"
                   and r.get("knn_top1") is not None), key=lambda r: (-r["knn_top1"], r["variant"]))


def ssl_sweep_best(sw: dict | None, q: dict | None) -> list[tuple[dict, dict]]:
    """Per SSL-teacher plan, its best finished variant by kNN (the ``published`` stand-in included): (plan, row)."""
    return [(plan, done[0]) for plan, rows, table in ssl_sweep_rows(sw, q)
            if (done := ssl_sweep_done(plan, rows, table))]


def ssl_sweep_section(sw: dict | None, q: dict | None) -> str:
    """The one-factor sweep distilling from the SSL teacher (sweep.py --ssl-teacher): per method the rows as in the
    supervised sweep, and each variant's student/teacher kNN against that teacher. Empty without such a sweep."""
    groups = ssl_sweep_rows(sw, q)
    if not groups:
        return ""
    teacher = (sw or {}).get("ssl_teacher") or {}
    teacher_knn = teacher.get("knn_top1")
    floor = (weak_methods(q)[1].get("random") or {}).get("knn_top1")
    out = [SWEEP_SSL_TITLE, "",
           f"The one-factor sweep of the section above (`benchmarks/sweep.py --ssl-teacher {teacher.get('spec')}`), "
           f"distilling from the self-supervised ResNet-18 teacher that quality.py pretrained under that spec "
           f"(kNN {pct(teacher_knn)} %, linear {pct(teacher.get('linear_top1'))} %) instead of the supervised one; "
           "same data, student, batch, seed and evaluation. Where `auto` derives the published values, the quality "
           "table's SSL-teacher cell is the `published` row. Student/teacher: a variant's kNN over the teacher's.", ""]
    for plan, rows, table in groups:
        out += sweep_group(plan, rows, table, floor)
        done = ssl_sweep_done(plan, rows, table)
        if teacher_knn and done:
            out += ["Student/teacher kNN (best first): " + ", ".join(
                f"{r['variant']} {r['knn_top1'] / teacher_knn:.3f}" for r in done) + ".", ""]
    if (sw or {}).get("commands"):
        out += sweep_commands(sw, "SSL-teacher sweep", f"Set-up as for the table (`{SETUP_COMMAND}`), and the SSL "
                              "teacher as in the SSL-teacher rows of the quality table (its `distillctl pretrain` "
                              "command is listed there).")
    return "\n".join(out)


def ssl_sweep_note(sw: dict | None, q: dict | None) -> str | None:
    """One closing-note line: per swept method, the best variant from the SSL teacher and its student/teacher kNN."""
    teacher = (sw or {}).get("ssl_teacher") or {}
    teacher_knn = teacher.get("knn_top1")
    best = ssl_sweep_best(sw, q)
    if not best or not teacher_knn:
        return None
    parts = []
    for plan, r in best:
        parts.append(f"{plan['method']} at {plan['budget']:,} images, best variant `{r['variant']}`: kNN "
                     f"{r['knn_top1']:.1f}% (student/teacher **{r['knn_top1'] / teacher_knn:.2f}**)")
    return (f"- From the SSL teacher ({teacher.get('spec')}, kNN {teacher_knn:.1f}%; one-factor sweep): "
            + "; ".join(parts) + ".")


def sweep_note(sw: dict | None, q: dict | None) -> str | None:
    """One closing-note line: each swept method's verdict."""
    plans = (sw or {}).get("plans") or {}
    if not plans:
        return None
    floor = (weak_methods(q)[1].get("random") or {}).get("knn_top1")
    rows = list(((sw or {}).get("rows") or {}).values())
    parts = []
    for key in sorted(plans, key=lambda k: (plans[k]["method"], plans[k]["budget"])):
        plan = plans[key]
        mine = [r for r in rows if r.get("method") == plan["method"] and r.get("budget") == plan["budget"]]
        parts.append(f"{plan['method']} at {plan['budget']:,}: {sweep_verdict(mine, floor)}")
    return "- What moves the weak methods (one-factor sweeps): " + " ".join(parts)


GEOMETRY_RESULTS = "geometry.json"


def geometry_verdict(row: dict, teacher: dict, collapsed: float) -> str:
    """What a cell's head geometry says, computed from the numbers (empty where nothing stands out); ``collapsed``:
    the collapse watch's threshold, recorded by geometry.py."""
    head = row.get("head")
    if not head:
        return ""
    if head["pair_cos"] >= collapsed and head["cos_to_teacher_mean"] >= collapsed:
        return ("collapsed onto the teacher's mean direction: every image gets nearly one embedding, and its cosine "
                f"to the teacher ({num(head['cos_to_teacher'], 3)}) is what that direction alone scores "
                f"({num(teacher['cos_to_own_mean'], 3)})")
    if head["pair_cos"] >= (1 + teacher["pair_cos"]) / 2 and head["cos_to_teacher_mean"] > head["cos_to_teacher"]:
        return (f"far more concentrated than the teacher's features (pair cos {num(head['pair_cos'], 3)} vs "
                f"{num(teacher['pair_cos'], 3)}) and closer to their mean direction than to each image's own target: "
                "mostly the teacher's average is fitted")
    return ""


def geometry_section(g: dict | None, q: dict | None = None) -> str:
    """The embedding-geometry table of benchmarks/geometry.py (diagnosis of the weak methods), or nothing. A row
    whose cell the quality table ``q`` has since measured again (another kNN under the same id) is labelled as the
    earlier run it describes, with the table's current number beside it."""
    if not g or not g.get("rows"):
        return ""
    table = {key: r for key, r in ((q or {}).get("rows") or {}).items() if r.get("status") == "done"}
    teacher, collapsed = g["teacher"], g["collapse_threshold"]
    out = ["### Embedding geometry of the finished students (why a method is weak)", "",
           f"`{g['command']}` on {g['images']:,} test images (centre view), for the table's cells at "
           f"{g['budget']:,} images. *pair cos*: mean cosine between the embeddings of different images (1: every "
           f"image maps to one direction; distillctl's collapse watch fires at {collapsed}); *1-NN*: leave-one-out "
           "nearest-neighbour label accuracy among those images. *head*: the method's linear head on the student, "
           "where the run saved one (its output is what the loss compares with the teacher's feature), with its "
           "cosine to the teacher's feature and to the teacher's mean direction.", "",
           "| cell | kNN top-1 % (table) | backbone pair cos | backbone 1-NN % | head pair cos | head cos to teacher "
           "| head cos to teacher's mean direction | reading |",
           "|---|---|---|---|---|---|---|---|",
           f"| teacher (supervised ResNet-18) | – | {num(teacher['pair_cos'], 3)} | {pct(teacher['nn1'])} | – | – | "
           f"{num(teacher['cos_to_own_mean'], 3)} (its own features) | reference |"]
    for key, row in sorted(g["rows"].items(), key=lambda kv: (kv[1].get("knn_top1") is None, kv[1].get("knn_top1") or 0)):
        head = row.get("head") or {}
        now = (table.get(key) or {}).get("knn_top1")
        name = row["method"] if now is None or now == row.get("knn_top1") else (
            f"{row['method']} (an earlier run of this cell; the table's cell now: {pct(now)} %)")
        out.append(f"| {name} | {pct(row.get('knn_top1'))} | {num(row['backbone']['pair_cos'], 3)} | "
                   f"{pct(row['backbone']['nn1'])} | {num(head.get('pair_cos'), 3)} | "
                   f"{num(head.get('cos_to_teacher'), 3)} | {num(head.get('cos_to_teacher_mean'), 3)} | "
                   f"{geometry_verdict(row, teacher, collapsed) or '–'} |")
    return "\n".join(out + [""])


# --- "Which method?": package data for `distillctl methods list` and the README section -------------------

def _protocol(q: dict) -> str:
    cfg = q["config"]
    return (f"CIFAR-10, {cfg.get('train_images', 0):,} training images ({cfg['data']['train']}), "
            f"{cfg.get('test_images', 0):,} test queries, {cfg['image_size']} px, student {cfg['students']}, "
            f"supervised ResNet-18 teacher, batch {cfg['batch_size']}, seed {cfg['seed']}")


def dense_suite_cells(d: dict | None) -> dict[str, list[dict]]:
    """The dense suite's finished cells per method (issue 14: its own students and teachers, not ranked with the
    main table), for the methods list: `same_protocol` when student and teacher are the main table's."""
    cfg, cells = (d or {}).get("config") or {}, {}
    ref = (d or {}).get("reference") or {}
    for r in sorted((d or {}).get("rows", {}).values(), key=lambda r: (r["method"], r["student"], r["budget"])):
        if r.get("status") == "done":
            cells.setdefault(r["method"], []).append({
                "images_seen": r["budget"], "knn_top1": r.get("knn_top1"), "linear_top1": r.get("linear_top1"),
                "dense_miou": (r.get("dense") or {}).get("miou"), "student": r["student"],
                "teacher": _teacher_label(r, cfg), "kind": r.get("kind"),
                "same_protocol": r["student"] == cfg.get("cnn_student") and r.get("teacher") == "sup",
                # the cell's own floor and ceiling: its student at random init, the teacher it was distilled from
                "random_init_knn_top1": (ref.get(f"random:{r['student']}") or {}).get("knn_top1"),
                "teacher_knn_top1": (_cell_teacher(r, ref) or {}).get("knn_top1")})
    return cells


def _cell_teacher(row: dict, ref: dict) -> dict | None:
    """The reference record of the teacher a dense-suite cell was distilled from (rebuilds and other specs
    included), or None (an SSL-only cell)."""
    if row.get("teacher") == "sup":
        return ref.get("teacher")
    if row.get("teacher") != "vit":
        return None
    for known in ref.get("vit_teacher_rebuilds") or []:
        if (row.get("vit_teacher_rebuild") and known.get("number") == row["vit_teacher_rebuild"]) or (
                row.get("vit_teacher_spec") and not known.get("number") and _spec(known) == row["vit_teacher_spec"]):
            return known
    return ref.get("vit_teacher")


def measured_data(q: dict, facts: dict, dense: dict | None = None) -> dict:
    """The measured table, per method and budget (rank among the distillation methods at that budget), with its
    source: what `distillctl methods list` shows and the README's "Which method?" section is made from. The dense
    suite's cells go under each method's `dense_suite` (the list shows them where the main table has none)."""
    finished = [r for r in q.get("rows", {}).values() if r.get("status") == "done" and r["teacher"] in ("sup", None)]
    done = []  # a method's best cell per budget (two presets' cells at one budget: the better one)
    for budget in sorted({r["budget"] for r in finished}):
        for kind in ("distill", "ssl"):
            done += best_per_method(r for r in finished if r["budget"] == budget and r["kind"] == kind)
    teacher = facts.get("teacher_knn")
    ranks: dict[tuple[int, str], tuple[int, int]] = {}
    for budget in sorted({r["budget"] for r in done}):
        for kind in ("distill", "ssl"):
            ranked = sorted((r for r in done if r["budget"] == budget and r["kind"] == kind),
                            key=lambda r: -(r.get("knn_top1") or 0))
            for i, r in enumerate(ranked):
                ranks[(budget, r["method"], kind)] = (i + 1, len(ranked))
    methods: dict[str, dict] = {}
    for r in sorted(done, key=lambda r: (r["method"], r["budget"])):
        rank, of = ranks[(r["budget"], r["method"], r["kind"])]
        methods.setdefault(r["method"], {"kind": r["kind"], "cells": []})["cells"].append({
            "images_seen": r["budget"], "knn_top1": r.get("knn_top1"), "linear_top1": r.get("linear_top1"),
            "student_teacher": round(r["knn_top1"] / teacher, 3) if teacher and r["kind"] == "distill" else None,
            "rank": rank, "of": of, "lr": cell_lr(r), "preset": cell_preset(r)})
    for method, cells in dense_suite_cells(dense).items():
        methods.setdefault(method, {"kind": cells[0]["kind"], "cells": []})["dense_suite"] = cells
    for method, cells in ssl_teacher_cells(q).items():
        methods.setdefault(method, {"kind": "distill", "cells": []})["ssl_teacher"] = cells
    machine = q.get("machine") or {}
    return {"source": {"file": "benchmarks/RESULTS.md", "made_by": "python benchmarks/render.py",
                       "results": "benchmarks/results/quality*.json", "commit": machine.get("git_commit"),
                       "date": machine.get("date_utc"), "protocol": _protocol(q)},
            "reference": {"teacher_knn_top1": teacher, "random_init_knn_top1": (facts.get("random") or {}).get("knn_top1")},
            "methods": methods}


def ssl_teacher_cells(q: dict) -> dict[str, list[dict]]:
    """Per method, its finished cells distilled from a self-supervised teacher (the mission's case; the main table's
    teacher is supervised), each with that teacher and the student/teacher kNN ratio against it."""
    out: dict[str, list[dict]] = {}
    rows = (r for r in q.get("rows", {}).values()
            if r.get("status") == "done" and r.get("teacher") == "ssl" and r.get("kind") == "distill")
    for r in sorted(rows, key=lambda r: (r["method"], r["budget"], -(r.get("knn_top1") or 0))):
        teacher = row_ssl_teacher(r, q)
        teacher_knn = teacher.get("knn_top1")
        out.setdefault(r["method"], []).append({
            "images_seen": r["budget"], "knn_top1": r.get("knn_top1"), "linear_top1": r.get("linear_top1"),
            "teacher": ssl_teacher_label(teacher), "teacher_knn_top1": teacher_knn,
            "student_teacher": round(r["knn_top1"] / teacher_knn, 3) if teacher_knn and r.get("knn_top1") else None,
            "lr": cell_lr(r), "preset": cell_preset(r), "collapsed": bool(r.get("collapse"))})
    return out


def ssl_teacher_line(methods: dict) -> str | None:
    """The README's sentence on distilling from the strongest SSL teacher measured: its cells per budget, best first."""
    cells = [(name, c) for name, m in methods.items() for c in m.get("ssl_teacher") or []
             if c.get("knn_top1") is not None and c.get("teacher_knn_top1")]
    if not cells:
        return None
    strongest = max(cells, key=lambda nc: nc[1]["teacher_knn_top1"])[1]["teacher"]
    cells = [(name, c) for name, c in cells if c["teacher"] == strongest]
    teacher_knn = cells[0][1]["teacher_knn_top1"]
    parts = []
    for budget in sorted({c["images_seen"] for _, c in cells}):
        at = sorted(((n, c) for n, c in cells if c["images_seen"] == budget), key=lambda nc: -nc[1]["knn_top1"])
        shown = ", ".join(f"{n}{_preset_tag(c)} {c['knn_top1']:.1f} ({c['knn_top1'] / c['teacher_knn_top1']:.2f})"
                          + (" (collapsed)" if c.get("collapsed") else "") for n, c in at)
        parts.append(f"at {budget:,} images seen: {shown}")
    return (f"From a self-supervised teacher — {strongest}, kNN {teacher_knn:.1f}, made with `distillctl pretrain` "
            f"(RESULTS.md's SSL-teacher rows) — best first, with student/teacher kNN: " + "; ".join(parts) + ".")


def _ratio_text(cell: dict, teacher: float | None) -> str:
    """`` (0.96)``: student/teacher kNN from the unrounded kNNs, as RESULTS.md computes it (82.15 / 86.0 = 0.9552 →
    0.96; measured.json's ratio, rounded to 0.955 first, would print 0.95)."""
    if not cell.get("student_teacher"):
        return ""
    return f" ({cell['knn_top1'] / teacher:.2f})" if teacher else f" ({cell['student_teacher']:.2f})"


def _preset_tag(cell: dict) -> str:
    return f" [{cell['preset']}]" if cell.get("preset") in ("auto", "published") else ""


def which_method_section(data: dict) -> str:
    """The README's "Which method?" block (numbers from :func:`measured_data` only)."""
    methods = data["methods"]
    budgets = sorted({c["images_seen"] for m in methods.values() for c in m["cells"]})
    floor = data["reference"].get("random_init_knn_top1")
    teacher = data["reference"].get("teacher_knn_top1")
    lines = [README_START, "## Which method?", "",
             f"Measured, not promised: kNN top-1 on the benchmark protocol ({data['source']['protocol']}); source "
             f"[`{data['source']['file']}`](benchmarks/RESULTS.md), commit {data['source']['commit']}. "
             "`distillctl methods list` shows the same numbers per method. Distillation methods ranked per budget "
             "(images seen), best first, with student/teacher kNN:", "",
             "| images seen | distillation, best first | best SSL-only (no teacher) | random-init student |",
             "|---|---|---|---|"]
    for budget in budgets:
        cells = sorted(((name, c) for name, m in methods.items() for c in m["cells"]
                        if c["images_seen"] == budget and m["kind"] == "distill"), key=lambda nc: nc[1]["rank"])
        ssl = sorted(((name, c) for name, m in methods.items() for c in m["cells"]
                      if c["images_seen"] == budget and m["kind"] == "ssl"), key=lambda nc: nc[1]["rank"])
        shown = ", ".join(f"{name}{_preset_tag(c)} {c['knn_top1']:.1f}" + _ratio_text(c, teacher)
                          for name, c in cells[:4]) + (f", … ({len(cells)} measured)" if len(cells) > 4 else "")
        best_ssl = f"{ssl[0][0]}{_preset_tag(ssl[0][1])} {ssl[0][1]['knn_top1']:.1f}" if ssl else "–"
        lines.append(f"| {budget:,} | {shown or '–'} | {best_ssl} | {pct(floor)} |")
    ssl_line = ssl_teacher_line(methods)
    if ssl_line:
        lines += ["", ssl_line]
    below_cells = {name: [c for c in m["cells"] if c["knn_top1"] is not None and c["knn_top1"] < floor]
                   for name, m in methods.items() if m["kind"] == "distill" and floor is not None}
    below = sorted(name for name, cells_below in below_cells.items() if cells_below)
    leaders = {budget: next((name for name, m in methods.items() for c in m["cells"] if m["kind"] == "distill"
                             and c["images_seen"] == budget and c["rank"] == 1), None) for budget in budgets}
    distinct = sorted({name for name in leaders.values() if name})
    lead = (f"{distinct[0]} is first at every budget measured" if len(distinct) == 1 else
            "first per budget: " + ", ".join(f"{leaders[b]} at {b:,}" for b in budgets if leaders[b]))
    def ran_auto(name: str) -> bool:  # a cell below the floor ran with method.preset=auto
        return any(c["preset"] == "auto" for c in below_cells[name])

    def where(name: str) -> str:  # the budgets of its cells below the floor
        budgets = sorted(c["images_seen"] for c in below_cells[name])
        return f"{name} ({', '.join(format(b, ',') for b in budgets)})"

    legacy = [name for name in below if not ran_auto(name)]
    sized = [name for name in below if ran_auto(name)]
    lines += ["", f"Which to use: the method first in the row of your budget ({lead}). "
              + (f"Below the random-init student on this protocol (at the budgets named): "
                 f"{', '.join(where(name) for name in below)}. " if below else "")
              + (f"{', '.join(legacy)} ran with the papers' settings (before method.preset): ImageNet-sized queues and "
                 "warm-ups and one lr for every method (RESULTS.md's lr column); the default `method.preset=auto` "
                 "now sizes queues, warm-ups, lr and EMA momentum to the run, and those cells have not been "
                 "re-measured with it yet. " if legacy else "")
              + (f"{', '.join(sized)} ran with `method.preset=auto` and are below it all the same at those budgets. "
                 if sized else "")
              + "Budgets, protocol and the exact commands are in benchmarks/RESULTS.md.", README_END]
    return "\n".join(lines)


def write_which_method(data: dict, measured: Path | None, readme: Path | None) -> None:
    """Write the package data file and replace the README block between its markers (left alone without them)."""
    if measured:
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        if not measured.is_file() or measured.read_text() != text:
            measured.write_text(text)
    if readme and readme.is_file():
        current = readme.read_text()
        if README_START in current and README_END in current:
            head, rest = current.split(README_START, 1)
            tail = rest.split(README_END, 1)[1]
            updated = head + which_method_section(data) + tail
            if updated != current:
                readme.write_text(updated)


def plot_quality(q: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for r in q.get("rows", {}).values():
        if r.get("status") == "done" and r["teacher"] in ("sup", None):
            series.setdefault(label(r) + (" (SSL-only)" if r["kind"] == "ssl" else ""), []).append(
                (r["budget"], r["knn_top1"]))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: the default cycle repeats after 10 methods
    for i, (name, points) in enumerate(sorted(series.items())):
        points.sort()
        xs, ys = zip(*points)
        curve = len(xs) > 1
        ax.plot(xs, ys, marker="s" if "SSL" in name else "o", linestyle="-" if curve else "none", label=name,
                color=colours[i % len(colours)], alpha=0.6 if "SSL" in name else 1.0, linewidth=2 if curve else 1,
                zorder=3 if curve else 2)
    teacher = (q.get("reference", {}).get("teacher_knn") or {}).get("sup")
    random_knn = (q.get("reference", {}).get("random") or {}).get("knn_top1")
    if teacher:
        ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label=f"teacher {teacher:.1f}%")
    if random_knn:
        ax.axhline(random_knn, color="grey", linestyle=":", linewidth=1, label=f"random-init {random_knn:.1f}%")
    ax.scatter([ISSUE_REFERENCE["images"]], [ISSUE_REFERENCE["knn_top1"]], marker="*", s=120, color="red",
               label="issue-8 reference distiller (quoted)")
    ax.set_xscale("log")
    ax.set_xlabel("images seen (log)")
    ax.set_ylabel("kNN top-1 % (2k CIFAR-10 test images)")
    ax.set_title("Student kNN accuracy vs training budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# --- speed, cache, export, gpu -------------------------------------------------------------------

def speed_section(s: dict | None, cache_bench: dict | None, plots: list[str]) -> tuple[str, dict]:
    out = ["## Speed and cost", ""]
    facts: dict = {}
    if not s:
        out.append("No speed results yet: run `python benchmarks/speed.py`.")
    loop = (s or {}).get("loop") or {}
    if loop.get("summary") and ((s.get("part_runs") or {}).get("loop") or {}).get("config"):
        s = {**s, "config": s["part_runs"]["loop"]["config"]}  # the loop's own settings, not a later part's
    if loop.get("summary"):
        out += ["### Distillation loop vs bare student step", "",
                f"`distillctl run` img/s (median over log windows of {s['config']['log_every']} steps, first window "
                f"excluded) vs a bare PyTorch loop doing only the student's forward, backward and SGD step on the "
                f"same pre-decoded 64 px views; batch {s['config']['batch_size']}, {s['config']['steps']} steps per "
                f"run, {s['config']['repeats']} interleaved repeats; ratio taken within each repeat. Bare loop: "
                f"{med(loop.get('bare_summary'), 1)} img/s.", ""]
        rows, ratios = [], []
        for key, value in sorted(loop["summary"].items()):
            if "/online_over_cached" in key or "images_per_sec" not in value:
                continue
            name, mode = key.split("/")
            ratio = value["ratio_loop_over_bare"]
            if ratio.get("median") is not None:
                ratios.append((name, mode, ratio["median"]))
            rows.append([name, mode, med(value["images_per_sec"], 1), med(ratio, 3), med(value["peak_rss_mib"], 0),
                         "; ".join(value.get("errors") or [])[:80]])
        out += [table(["method", "teacher", "loop img/s", "loop / bare", "peak RSS MiB (distill process)", "errors"],
                      rows), ""]
        facts["loop_ratios"] = ratios
        oc = [(k.split("/")[0], v["epoch_time_ratio"]) for k, v in loop["summary"].items() if k.endswith("online_over_cached")]
        if oc:
            out += ["Online / cached epoch-time ratio (same method, same repeat):", "",
                    table(["method", "online / cached"], [[n, med(v, 2)] for n, v in sorted(oc)]), ""]
            facts["online_over_cached"] = oc
    profile = BENCH / "results" / "loop_profile.md"  # where the loop's time goes (hand-written from the profiles)
    if profile.is_file():
        out += [profile.read_text().strip(), ""]
    if cache_bench:
        cfg = cache_bench.get("config", {})
        out += ["### Online vs cached epoch, ResNet-50-class teacher (benchmarks/cache_bench.py)", "",
                f"Teacher `{cfg.get('teacher')}` → student `{cfg.get('student')}`, {cfg.get('images')} images at "
                f"{cfg.get('image_size')} px, batch {cfg.get('batch_size')}, K = {cfg.get('views')}, "
                f"{cfg.get('repeats')} repeats (fastest counts), {cfg.get('weights')}.", "",
                table(["epoch", "seconds"], [[k, num(v, 2)] for k, v in (cache_bench.get("epoch_seconds") or {}).items()]),
                "", f"online / cached = **{cache_bench.get('ratio_online_over_cached')}**, cached / student-only = "
                    f"{cache_bench.get('ratio_cached_over_student_only')}; phase-based online / cached = "
                    f"{(cache_bench.get('phase_based') or {}).get('ratio_online_over_cached')}; median-per-batch "
                    f"online / cached = {(cache_bench.get('median_per_batch') or {}).get('ratio_online_over_cached', '–')}. "
                    f"Build: "
                    f"{(cache_bench.get('build') or {}).get('images_per_second')} img/s, "
                    f"{(cache_bench.get('build') or {}).get('bytes_per_image_on_disk')} bytes/image on disk. "
                    f"Command: `{cache_bench.get('command')}`.", ""]
        facts["cache_bench"] = cache_bench.get("ratio_online_over_cached")
        expected = cache_bench.get("expected_ratio") or {}
        if expected:
            epochs, cpu = expected.get("epochs") or {}, (expected.get("cpu_time") or {}).get("epochs") or {}
            facts["cache_bench_expected"] = expected.get("expected_online_over_cached")
            out += [f"Expected online / cached = (teacher forward + student step) / student step, each timed alone in "
                    f"the same process: **{expected.get('expected_online_over_cached')}**; measured "
                    f"{epochs.get('measured')} (deviation {epochs.get('deviation')}, within 10 %: "
                    f"{epochs.get('within_target')}); by process CPU time expected {cpu.get('expected')}, measured "
                    f"{cpu.get('measured')} (within 10 %: {cpu.get('within_target')}).", ""]
    cache = (s or {}).get("cache") or {}
    if cache.get("builds"):
        out += ["### Feature-cache build (ResNet-18 teacher, 64 px)", "",
                f"`distillctl cache build` on {cache['images']:,} images (`{cache['data']}`), one run per K.", "",
                table(["K views", "img/s", "views/s", "bytes/image on disk", "feature bytes/image", "peak RSS MiB", "wall s"],
                      [[k, num(v["images_per_sec"]), num(v["views_per_sec"]), num(v["bytes_per_image"], 0),
                        num(v.get("feature_bytes_per_image"), 0), num(v["peak_rss_mib"], 0), num(v["wall_s"], 1)]
                       for k, v in sorted(cache["builds"].items(), key=lambda kv: int(kv[0]))]), ""]
    scaling = (s or {}).get("scaling") or {}
    if scaling.get("sizes"):
        out += ["### Epoch time vs dataset size", "",
                f"One full epoch of `{scaling['method']}` (teacher {scaling['mode']}), batch "
                f"{s['config']['batch_size']}, distill-stage wall time; process wall includes start-up, dataset scan "
                f"and manifest hashing.", "",
                table(["images", "epoch s", "img/s", "process wall s", "peak RSS MiB"],
                      [[f"{int(k):,}", num(v["epoch_s"], 1), num(v["images_per_sec"], 1), num(v["process_wall_s"], 1),
                        num(v["peak_rss_mib"], 0)] for k, v in sorted(scaling["sizes"].items(), key=lambda kv: int(kv[0]))]),
                ""]
        if "scaling" in plots:
            out += ["![epoch time vs dataset size](epoch_time_vs_size.png)", ""]
    for part in ("loop", "cache", "scaling"):
        if isinstance((s or {}).get(part), dict) and s[part].get("error"):
            out.append(f"{part} part failed: {s[part]['error']}")
    runs = (s or {}).get("part_runs") or {}
    if runs:
        out += ["Commands (each part as it was last measured):", ""]
        for part in ("loop", "cache", "scaling"):
            if part in runs:
                run = runs[part]
                out.append(f"- {part}: `{run['command']}` ({num((run.get('seconds') or 0) / 60, 1)} min, finished "
                           f"{run.get('finished_utc')}, load average at start {run.get('load_average')})")
        out.append("")
    elif s:
        out += [f"Command: `{s.get('command')}` ({num((s.get('elapsed_s') or 0) / 60, 1)} min).", ""]
    return "\n".join(out), facts


def plot_scaling(s: dict, path: Path) -> bool:
    sizes = ((s or {}).get("scaling") or {}).get("sizes") or {}
    points = sorted((int(k), v["epoch_s"]) for k, v in sizes.items() if v.get("epoch_s"))
    if len(points) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = zip(*points)
    ax.plot(xs, ys, marker="o")
    ax.set_xlabel("training images")
    ax.set_ylabel("epoch time (s)")
    ax.set_title("Epoch time vs dataset size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def random_weights_section(runs: list[dict | None]) -> str:
    """Seeded random-weight students exported and timed by ``export_bench.py --random-weights`` (no shared data):
    speed-ups by process CPU time, every format interleaved with ORT fp32 in one process."""
    runs = [r for r in runs if r and r.get("results")]
    if not runs:
        return ""
    rows = []
    for r in runs:
        for v in r["results"]:
            if v.get("format") != "onnx":
                rows.append([r.get("arch"), r.get("image_size"), v.get("format"), v.get("batch"),
                             num(v.get("cpu_p50_ms"), 3), num(v.get("speedup_vs_onnx_fp32_cpu"), 2)])
    out = ["", "### Random-weight students at 64 and 224 px (`export_bench.py --random-weights`)", "",
           "Seeded random weights, so no accuracy gate applies; every format interleaved with ORT fp32 in one "
           "process, 1 thread, pinned; speed-ups by process CPU time.", "",
           table(["arch", "px", "format", "batch", "CPU p50 ms", "× vs ONNX fp32 (CPU time)"], rows), "",
           "Commands: " + "; ".join(f"`{r.get('command')}`" for r in runs) + ".", ""]
    return "\n".join(out)


def export_section(e: dict | None) -> tuple[str, dict]:
    if not e:
        return "## Export latency (CPU)\n\nNo results yet: run `python benchmarks/export_bench.py`.\n", {}
    threads = e.get("threads")
    pinned = f", pinned to CPU {e['pinned_cpus']}" if e.get("pinned_cpus") else ""
    out = ["## Export latency (CPU)", "",
           f"Student of `{e['run']}`; `{e['bench_command']}` run as separate processes"
           f"{f' ({threads} thread{pinned})' if threads else ''}; p50 per process, then median [min–max] over "
           "processes; speed-ups within a process. gate: the artefact's export verdict (parity, and for INT8 the "
           "kNN budget).", ""]
    rows = []
    for key, v in sorted(e["latency"].items(), key=lambda kv: (kv[1]["batch"], kv[1]["format"])):
        rows.append([v["format"], v["batch"], med(v["p50_ms"], 2), med(v.get("cpu_p50_ms"), 2), med(v["p90_ms"], 2),
                     med(v["images_per_sec"], 0), med(v.get("speedup_vs_onnx_fp32"), 2),
                     med(v.get("speedup_vs_onnx_fp32_cpu"), 2), med(v.get("speedup_vs_torch"), 2), v.get("gate", "-"),
                     num(v.get("size_mb"), 2)])
    out += [table(["format", "batch", "p50 ms", "CPU p50 ms", "p90 ms", "img/s", "× vs ONNX fp32",
                   "× vs ONNX fp32 (CPU time)", "× vs torch", "gate", "size MB"], rows), "",
            "CPU time is the benchmark process's own (`time.process_time`), which other jobs on the machine do not "
            "inflate; wall-clock medians on a loaded machine can overstate a speed-up several-fold.", ""]
    acc = e.get("int8_accuracy") or {}
    facts = {"int8": acc, "latency": e["latency"], "targets": e.get("targets")}
    t = e.get("targets") or {}
    if t:
        met = t.get("met") or {}
        fastest = next((v for k, v in t.items() if k.startswith("fastest_b")), None) or {}

        def mark(key: str) -> str:
            return "met" if met.get(key) else "NOT met"

        out.append(f"Targets (issue 15), ORT INT8 = `{t.get('int8_form')}`: "
                   f"INT8 vs ORT fp32 at batch 1 {num(t.get('int8_vs_onnx_b1'), 2)}× "
                   f"({num(t.get('int8_vs_onnx_b1_cpu'), 2)}× by CPU time; ≥ 2.5×: {mark('int8_vs_onnx_b1')}), "
                   f"at batch 32 {num(t.get('int8_vs_onnx_b32'), 2)}× "
                   f"({num(t.get('int8_vs_onnx_b32_cpu'), 2)}× by CPU time; ≥ 2×: {mark('int8_vs_onnx_b32')}); "
                   f"kNN drop {num(t.get('int8_knn_drop'), 2)} points (≤ 1: {mark('int8_knn_drop')}); "
                   f"INT8 cosine gate {mark('int8_cosine_gate')}; fastest passing format at batch 32: "
                   f"{fastest.get('format', '-')} at {num(fastest.get('speedup_vs_onnx_fp32'), 2)}× ORT fp32 "
                   f"(≥ 3×: {mark('fastest_vs_onnx_b32')}).")
    if acc:
        out.append(f"\nINT8 kNN top-1: fp32 {num(acc.get('reference_top1'), 2)}% → INT8 {num(acc.get('candidate_top1'), 2)}% "
                   f"(drop {num(acc.get('drop'), 2)} points; the product's default gate is 1 point).")
    calibration = ((e.get("export_report") or {}).get("onnx-int8") or {}).get("quantization") or {}
    if calibration:
        out.append(f"INT8 artefact: form {calibration.get('form')}, calibration {calibration.get('calibration_method')} "
                   f"on {calibration.get('calibration_images')} images, layers left in float: "
                   f"{', '.join(calibration.get('excluded_nodes') or []) or 'none'}.")
    if e.get("load_average"):
        out.append(f"Machine load average (1/5/15 min) before {e['load_average']['before']}, after "
                   f"{e['load_average']['after']} (other processes share the cores; ratios are within a process).")
    if e.get("skipped_formats"):
        out.append(f"Skipped (extra not installed): {', '.join(e['skipped_formats'])}.")
    if e.get("gate_error"):
        out.append(f"\n`distillctl export` exited 3 (a gate failed; artefacts and numbers kept): {e['gate_error']}\n")
    out.append("")
    for name, parity in (e.get("parity") or {}).items():
        if parity:
            out.append(f"- parity {name}: max|Δ| {num(parity.get('max_abs'), 4)}, mean cosine "
                       f"{num(parity.get('mean_cosine'), 4)}, p1 cosine {num(parity.get('p1_cosine'), 4)}, passed "
                       f"{parity.get('passed')}")
    out += ["", f"Export command: `{e['export_command']}`; benchmark command: `{e.get('command', '-')}`.", ""]
    return "\n".join(out), facts


def gpu_section(g: dict | None) -> str:
    out = ["## GPU (benchmarks/gpu_check.sh)", ""]
    if not g:
        out.append("No GPU was lent to the session that produced these results, so there are no GPU numbers. "
                   "`bash benchmarks/gpu_check.sh` runs the prepared check (ResNet-50 → MobileNetV2 at 224 px, bf16, "
                   "channels_last, torch.compile; synthetic on-GPU tensors and cache replay; cache build; ONNX Runtime "
                   "CUDA) and writes results/gpu_check.json; targets: shared/docs/export_cache_data.md §C.3.")
        return "\n".join(out) + "\n"
    out.append(f"GPU: **{g.get('gpu')}** ({g.get('date_utc')}), torch {g.get('torch')}, onnxruntime {g.get('onnxruntime')}.")
    out.append("")
    rows = [[k, v if not isinstance(v, float) else f"{v:,.1f}"] for k, v in sorted(g.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out += [table(["measure", "value"], rows), ""]
    return "\n".join(out)


def summary_section(qf: dict, sf: dict, ef: dict, q: dict | None, dense: dict | None = None,
                    sweep: str | None = None) -> str:
    out = ["## Closing note", ""]
    if qf.get("best"):
        best = qf["best"]
        line = (f"- Best method at {qf['budget']:,} images (the full table, {len(qf['distill'])} distillation methods): "
                f"**{label(best)}**, kNN {best['knn_top1']:.1f}% "
                f"(teacher {pct(qf['teacher_knn'])}%, student/teacher **{num(qf.get('ratio'), 2)}**)")
        if qf.get("best_ssl"):
            line += (f"; gain over the best SSL-only student at the same budget ({qf['best_ssl']['method']}, "
                     f"{qf['best_ssl']['knn_top1']:.1f}%): **{qf['gain']:+.1f} points**")
        out.append(line + ".")
    for budget, facts in sorted((qf.get("long") or {}).items(), reverse=True):
        for r in facts["distill"]:
            lr = cell_lr(r)
            line = f"- {label(r)} at {budget:,} images" + (f" (lr {lr:g})" if lr else "") + f": kNN {r['knn_top1']:.1f}%"
            if qf.get("teacher_knn"):
                line += f" (student/teacher {r['knn_top1'] / qf['teacher_knn']:.2f})"
            if budget == ISSUE_REFERENCE["images"]:
                line += (f" vs {ISSUE_REFERENCE['knn_top1']}% for the issue-8 reference distiller at "
                         f"{ISSUE_REFERENCE['images']:,} (quoted, not measured here)")
            out.append(line + ".")
    if sf.get("loop_ratios"):
        parts = ", ".join(f"{n} {m} {r:.2f}" for n, m, r in sorted(sf["loop_ratios"]))
        out.append(f"- Distillation loop / bare student loop throughput: {parts}.")
    if sf.get("online_over_cached"):
        out.append("- Online / cached epoch time (ResNet-18 teacher, 64 px): "
                   + ", ".join(f"{n} {v['median']:.2f}" for n, v in sorted(sf["online_over_cached"])) + ".")
    if sf.get("cache_bench") is not None:
        expected = sf.get("cache_bench_expected")
        out.append(f"- Online / cached epoch time, ResNet-50 → MobileNetV2 (cache_bench.py): {sf['cache_bench']}"
                   + (f" (expected (teacher + student) / student {expected}, target within 10 %)" if expected else "")
                   + ".")
    lat = ef.get("latency") or {}
    for batch in (1, 32):
        int8 = lat.get(f"onnx-int8@{batch}") or {}
        if int8.get("speedup_vs_torch"):
            out.append(f"- INT8 latency at batch {batch}: {med(int8['speedup_vs_torch'], 2)}× vs PyTorch eager, "
                       f"{med(int8.get('speedup_vs_onnx_fp32'), 2)}× vs ONNX fp32"
                       + (f" ({med(int8['speedup_vs_onnx_fp32_cpu'], 2)}× by CPU time)"
                          if int8.get("speedup_vs_onnx_fp32_cpu") else "") + ".")
    if ef.get("int8"):
        out.append(f"- INT8 kNN accuracy delta: {num(-ef['int8'].get('drop', 0), 2)} points.")
    if dense_note(dense):
        out.append(dense_note(dense))
    if sweep:
        out.append(sweep)
    if q:
        out.append(f"- Quality suite running time: {num(suite_minutes(q), 1)} min summed over its invocations "
                   f"(calendar span {num(calendar_minutes(q), 1)} min, pauses included).")
    return "\n".join(out) + "\n"


def machine_section(*results: dict | None) -> str:
    m = next((r["machine"] for r in results if r and r.get("machine")), None)
    if not m:
        return ""
    v = m.get("versions", {})
    return ("## Machine\n\n"
            f"{m.get('cpu_model')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM, GPU: {m.get('gpu') or 'none'}; "
            f"{m.get('platform')}; load average at start {m.get('load_average')} (the machine was shared with other "
            f"jobs: timings are medians with the spread shown). Versions: "
            + ", ".join(f"{k} {val}" for k, val in v.items() if val) + f". Commit {m.get('git_commit')}, "
            f"{m.get('date_utc')}.\n")


def ssl_teachers(reference: dict) -> list[dict]:
    """The SSL teachers a result file's rows distilled from (``ssl_teachers`` once merged, else its one)."""
    if "ssl_teachers" in reference:
        return list(reference["ssl_teachers"])
    return [reference["ssl_teacher"]] if reference.get("ssl_teacher") else []


def tag_ssl_teacher(rows: dict, reference: dict) -> dict:
    """Each SSL-teacher row with the teacher of its own result file (``ssl_teacher_ref``): files of different SSL
    teachers share the row teacher ``ssl``, so the file's reference tells them apart."""
    teacher = reference.get("ssl_teacher")
    return {key: ({**row, "ssl_teacher_ref": teacher} if row.get("teacher") == "ssl" and teacher
                  and "ssl_teacher_ref" not in row else row) for key, row in rows.items()}


def row_ssl_teacher(row: dict, q: dict) -> dict:
    """The SSL teacher a row distilled from: the one of its own result file, else the merged file's ({} if none)."""
    return row.get("ssl_teacher_ref") or q.get("reference", {}).get("ssl_teacher") or {}


def ssl_teacher_label(teacher: dict | None) -> str:
    if not teacher:
        return "ResNet-18 SSL"
    return f"ResNet-18 SSL ({teacher.get('method')}, {teacher.get('budget', 0):,} images)"


def later_rows(main: dict, rows: dict, extra: dict, extra_rows: dict) -> tuple[dict, dict]:
    """``rows`` (of the ``main`` results) with ``extra_rows`` added, and when each row was measured (its file's finish
    time): a cell both measured keeps the measurement of the run that finished later. A finished measurement it
    replaces that trained at another learning rate (the preset derives another lr since) or with another teacher
    mode (the teacher online, then from the feature cache) is a different experiment: it stays, under
    ``<key>@lr=<lr>`` / ``<key>@mode=<mode>``, so the table keeps the evidence for the change."""
    rows = dict(rows)
    measured_at = dict(main.get("row_finished_utc") or {key: main.get("finished_utc") or "" for key in rows})
    finished = extra.get("finished_utc") or ""
    for key, row in extra_rows.items():
        if key not in rows or finished > (measured_at.get(key) or ""):
            old = rows.get(key)
            differs = []
            if old and old.get("status") == "done" and row.get("status") == "done":
                old_lr, old_mode = cell_lr(old), old.get("teacher_mode")
                if old_lr is not None and cell_lr(row) not in (None, old_lr):
                    differs.append(f"lr={old_lr:g}")
                if old_mode and row.get("teacher_mode") not in (None, old_mode):
                    differs.append(f"mode={old_mode}")
            if differs:
                kept = f"{key}@{','.join(differs)}"
                rows[kept], measured_at[kept] = old, measured_at.get(key) or ""
            rows[key], measured_at[key] = row, finished
    return rows, measured_at


def merge_quality(main: dict | None, extra: dict | None) -> dict | None:
    """Add the rows of a second quality run (e.g. the SSL-teacher cells run as their own process). A cell both runs
    measured (the same row key) keeps the measurement of the run that finished later: re-measuring a cell into a new
    result file (after a preset change, say) replaces the old row without editing the old file."""
    if not extra:
        return main
    if not main:
        return extra
    merged = {**main, "rows": dict(main.get("rows") or {}), "reference": dict(main.get("reference") or {})}
    merged["rows"] = tag_ssl_teacher(merged["rows"], merged["reference"])
    merged["reference"]["ssl_teachers"] = ssl_teachers(merged["reference"])
    # when each row was measured (its file's finish time): a cell measured again by a later run replaces it
    extra_reference = extra.get("reference") or {}
    merged["rows"], merged["row_finished_utc"] = later_rows(
        main, merged["rows"], extra, tag_ssl_teacher(extra.get("rows") or {}, extra_reference))
    known = {t.get("id") for t in merged["reference"]["ssl_teachers"]}
    merged["reference"]["ssl_teachers"] += [t for t in ssl_teachers(extra_reference) if t.get("id") not in known]
    for key in ("ssl_teacher", "ssl_teacher_error"):
        if key in extra_reference and key not in merged["reference"]:
            merged["reference"][key] = extra_reference[key]
    merged["extra_commands"] = list(main.get("extra_commands") or []) + [extra.get("command")]
    return merged


def table_quality(results: Path) -> dict | None:
    """The main table's results: quality.json merged with the cells run as separate invocations
    (quality_*.json), without the --quick smoke run and the dense suite (its own section)."""
    q = load(results, "quality.json")
    for extra in sorted(results.glob("quality_*.json")):
        if extra.name == "quality_quick.json":
            continue
        data = load(results, extra.name)
        # the dense suite is told apart by what it recorded, not by its file name (quality_densereg_*.json is a
        # table-suite run of the dense-reg method)
        if data and data.get("suite", "table") != "dense":
            q = merge_quality(q, data)
    return q


def _teacher_differs(a: dict, b: dict) -> bool:
    """Two records of the ViT teacher are different teachers when their scores differ (a rebuild's training is not
    bit-identical across thread counts)."""
    return not _same_spec(a, b) or any(a.get(k) != b.get(k) for k in ("knn_top1", "linear_top1"))


def _same_spec(a: dict, b: dict) -> bool:
    """Two ViT-teacher records of one spec (method, architecture, images): a rebuild, not another teacher."""
    return all(a.get(k) == b.get(k) for k in ("method", "student", "budget"))


def _spec(teacher: dict) -> str:
    """A ViT teacher's METHOD:ARCH:IMAGES, as --vit-teacher takes it."""
    return f"{teacher.get('method')}:{teacher.get('student')}:{teacher.get('budget')}"


def dense_quality(results: Path) -> dict | None:
    """The dense suite's results: quality_dense.json merged with the dense-suite runs written to other files
    (quality_*.json whose recorded suite is "dense", e.g. the ViT-teacher cells at another budget). A cell both
    measured keeps the later run's measurement; reference rows the main file lacks are taken from the others; the
    running times add up and each extra invocation's command is listed."""
    d = load(results, DENSE_RESULTS)
    for extra in sorted(results.glob("quality_*.json")):
        data = load(results, extra.name) if extra.name != DENSE_RESULTS else None
        if not data or data.get("suite") != "dense" or extra.stem.endswith("_quick"):  # --quick smoke runs stay out
            continue
        if not d:
            d = data
            continue
        merged = {**d, "rows": dict(d.get("rows") or {}), "reference": dict(d.get("reference") or {})}
        merged["rows"], merged["row_finished_utc"] = later_rows(d, merged["rows"], data, data.get("rows") or {})
        reference = dict(data.get("reference") or {})
        mine, theirs = merged["reference"].get("vit_teacher"), reference.get("vit_teacher")
        if mine and theirs and _teacher_differs(mine, theirs):
            # this run pretrained its own ViT teacher and got another one (e.g. at another thread count): its
            # cells are labelled with that rebuild (one row per distinct rebuild, numbered from 2)
            rebuilds = list(merged["reference"].get("vit_teacher_rebuilds") or [])
            known = next((known for known in rebuilds if not _teacher_differs(known, theirs)), None)
            if known is None:
                # rebuilds of the same spec are numbered from 2; a teacher of another spec is named by its spec
                number = (2 + sum(1 for k in rebuilds if k.get("number"))) if _same_spec(mine, theirs) else None
                known = {**theirs, "file": extra.name, "number": number}
                rebuilds.append(known)
            reference.pop("vit_teacher")
            merged["reference"]["vit_teacher_rebuilds"] = rebuilds
            tag = ({"vit_teacher_rebuild": known["number"]} if known.get("number")
                   else {"vit_teacher_spec": _spec(known)})
            merged["rows"] = {key: ({**row, **tag}
                                    if key in (data.get("rows") or {}) and row.get("teacher") == "vit"
                                    and merged["rows"][key] is data["rows"][key] else row)
                              for key, row in merged["rows"].items()}
        for key, row in reference.items():
            merged["reference"].setdefault(key, row)
        if d.get("elapsed_s") is not None or data.get("elapsed_s") is not None:
            merged["elapsed_s"] = (d.get("elapsed_s") or 0) + (data.get("elapsed_s") or 0)
        merged["extra_commands"] = list(d.get("extra_commands") or []) + [data.get("command")]
        d = merged
    return d


def render(results: Path, out: Path, plots_enabled: bool = True, measured: Path | None = None,
           readme: Path | None = None) -> str:
    q, s, e = table_quality(results), load(results, "speed.json"), load(results, "export.json")
    cache_bench = load(results, "cache_bench_cifar10.json") or load(results, "cache_bench.json")
    gpu = load(results, "gpu_check.json")
    dense = dense_quality(results)
    plots = []
    if plots_enabled and q and plot_quality(q, out.parent / "quality_budget.png"):
        plots.append("curve")
    if plots_enabled and s and plot_scaling(s, out.parent / "epoch_time_vs_size.png"):
        plots.append("scaling")
    quality_md, qf = quality_section(q, plots)
    sweep = load(results, SWEEP_RESULTS)
    ssl_sweep = load(results, SWEEP_SSL_RESULTS)
    ssl_sweep_md = ssl_sweep_section(ssl_sweep, q)
    speed_md, sf = speed_section(s, cache_bench, plots)
    export_md, ef = export_section(e)
    export_md += random_weights_section([load(results, f.name) for f in sorted(results.glob("export_random_*.json"))])
    text = "\n".join([
        "# distillctl benchmark results", "",
        "Generated by `python benchmarks/render.py` from `benchmarks/results/*.json` (made by `make bench` / "
        "`python benchmarks/run_all.py`). Do not edit by hand.", "",
        summary_section(qf, sf, ef, q, dense, "\n".join(n for n in (sweep_note(sweep, q), ssl_sweep_note(ssl_sweep, q))
                                                            if n) or None),
        machine_section(q, s, e), quality_md, sweep_section(sweep, q),
        *([ssl_sweep_md] if ssl_sweep_md else []),
        geometry_section(load(results, GEOMETRY_RESULTS), q), dense_section(dense), speed_md, export_md, gpu_section(gpu),
    ])
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    if q and qf:
        write_which_method(measured_data(q, qf, dense), measured, readme)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    render(Path(args.results), Path(args.out), plots_enabled=not args.no_plots,
           measured=Path(args.measured) if args.measured else None, readme=Path(args.readme) if args.readme else None)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
