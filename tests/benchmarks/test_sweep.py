"""benchmarks/sweep.py (issue 16 §2): the one-factor plan from the product's preset derivations, the cells through
quality.py's command builder, the run check, render.py's sweep section from a hand-made sweep.json, the dry run,
and (slow) a tiny real sweep that resumes without rerunning anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_dense_suite import _env, _shared  # noqa: E402  (tiny ../shared: 8 px JPEG tarball + teacher card)

PROTOCOL = (10_000, 64, 30_000)  # training images, batch, images seen: the quality table's cells


def _facts(method: str):
    from distillctl.methods.base import get_method
    from distillctl.methods.presets import method_facts

    return method_facts(get_method(method))


def _plan(method: str, grid: list[str] = (), suspects: bool = False, size=PROTOCOL):
    import sweep

    return sweep.plan_variants(_facts(method), sweep.run_size(*size), sweep.parse_grid(list(grid)), suspects)


def test_plan_isolates_every_key_auto_derives_differently():
    import sweep
    from distillctl.methods.presets import derive_queue

    variants = {v.name: v for v in _plan("rekd")}
    # auto leaves the lr underived for rekd here (in-batch negatives), so there is no +train.lr variant
    assert list(variants) == ["published", "auto", "+head_bn", "+momentum", "+negatives", "+queue_size"]
    size = sweep.run_size(*PROTOCOL)
    assert size.steps == 468 and size.images_seen == 29_952  # whole steps of 64, as the pipeline plans them
    queue = derive_queue(65_536, _facts("rekd").queue_negatives, size)[0]
    assert queue == 8192
    assert variants["+queue_size"].sets == (f"method.params.queue_size={queue}",)
    assert variants["+queue_size"].preset == "published" and variants["+queue_size"].factors == {
        "method.params.queue_size": 8192}
    assert variants["+momentum"].sets == ("method.params.momentum=0.99",)
    assert variants["+negatives"].sets == ("method.params.negatives=batch",)  # a plain word: no quotes
    assert variants["+negatives"].slug == "published+negatives=batch"
    assert variants["auto"].preset == "auto" and variants["auto"].sets == ()
    assert variants["auto"].factors == {"method.params.queue_size": 8192, "method.params.momentum": 0.99,
                                        "method.params.negatives": "batch", "method.params.head_bn": True}
    assert variants["+head_bn"].sets == ("method.params.head_bn=true",)
    assert variants["published"].factors == {} and variants["published"].slug == "published"
    assert variants["+queue_size"].slug == "published+queue_size=8192"  # the value names the folder


def test_keys_equal_in_both_presets_give_no_variant():
    # byol: only the EMA momentum differs (its LARS lr is not transferred to SGD), so `auto` is that variant
    byol = _plan("byol")
    assert [v.name for v in byol] == ["published", "auto"]
    assert byol[1].factors == {"method.params.momentum": 0.99}
    assert not any("train.lr" in item for v in byol for item in v.sets)
    # mse-reg: nothing differs, so `published` is the only cell (an auto cell would train the same settings)
    assert [v.name for v in _plan("mse-reg")] == ["published"]
    # ImageNet-sized: auto gives the published values back, nothing to sweep
    assert [v.name for v in _plan("disco", size=(1_281_167, 256, 1_281_167 // 256 * 256 * 200))] == ["published"]


def test_leave_one_out_puts_each_derived_key_back_at_the_paper_value():
    """smd's short-run settings (five keys) as one-factor points of published and, with leave_one_out, as auto
    minus one key each; the paper's value of a key only auto derives comes from the Params defaults (None for the
    architecture-chosen temperature, written so YAML reads it back)."""
    import sweep

    size = sweep.run_size(*PROTOCOL)
    plain = [v.name for v in sweep.plan_variants(_facts("smd"), size)]
    assert plain == ["published", "auto", "+center", "+temperature", "+times", "+warmup_epochs", "+train.lr"]
    variants = {v.name: v for v in sweep.plan_variants(_facts("smd"), size, leave_one_out=True)}
    assert list(variants)[len(plain):] == ["auto-center", "auto-temperature", "auto-times",
                                           "auto-warmup_epochs", "auto-train.lr"]
    assert variants["auto-temperature"].preset == "auto"
    assert variants["auto-temperature"].sets == ("method.params.temperature=null",)
    assert variants["auto-train.lr"].sets == ("train.lr=0.0125",)  # the paper's 0.1 at batch 512, its linear rule
    assert variants["auto-center"].factors == {"method.params.times": 0.0, "method.params.temperature": 0.4,
                                               "method.params.warmup_epochs": 1.5, "train.lr": 0.05}
    assert variants["auto-warmup_epochs"].sets == ("method.params.warmup_epochs=2",)  # the paper's 2 epochs
    assert variants["auto-center"].source == "leave-one-out" and variants["auto-center"].slug == "auto+center=none"
    # two derived keys: leaving one out is the other's one-factor point, already planned
    disco = [v.name for v in sweep.plan_variants(_facts("disco"), size, leave_one_out=True)]
    assert disco == ["published", "auto", "+momentum", "+queue_size"]


def test_grid_and_suspects_add_one_factor_points():
    seed = _plan("seed", ["method.params.queue_size=1024,65536,8192", "train.lr=0.01", "method.params.nope=1"])
    # 65536 is the published cell and 8192 the auto one (seed's only derived difference): planned once each
    assert [(v.name, v.sets) for v in seed] == [
        ("published", ()), ("auto", ()),
        ("queue_size=1024", ("method.params.queue_size=1024",)), ("train.lr=0.01", ("train.lr=0.01",))]
    assert all(v.preset == "published" for v in seed[2:])
    disco = {v.name: v for v in _plan("disco", suspects=True)}
    assert {"train.lr=0.01", "train.lr=0.09", "temperature=0.1", "temperature=0.4"} <= set(disco)
    seed = {v.name: v for v in _plan("seed", ["method.params.teacher_temperature=1e-3"], suspects=True)}
    # YAML 1.1 reads 5e-05 as a string: the --set text is written out in full
    assert seed["teacher_temperature=0.00005"].sets == ("method.params.teacher_temperature=0.00005",)
    assert seed["teacher_temperature=0.001"].factors == {"method.params.teacher_temperature": 0.001}
    # a method without a published lr sweeps around the recipe's default lr (0.05)
    assert {"train.lr=0.01667", "train.lr=0.15"} <= {v.name for v in _plan("mse-reg", suspects=True)}


def test_bad_grid_is_a_usage_error():
    import sweep

    for bad in (["train.lr"], ["train.lr="], ["model.width=2"]):
        with pytest.raises(sweep.SweepUsage):
            sweep.parse_grid(bad)
    with pytest.raises(sweep.SweepUsage, match="not a train setting"):
        _plan("seed", ["train.nope=1"])
    with pytest.raises(sweep.SweepUsage, match="none of smd has a param 'queue_size'"):
        sweep.grid_keys_known(sweep.parse_grid(["method.params.queue_size=1024"]), {"smd": _facts("smd")})


def test_auto_plan_matches_a_recorded_run():
    """The table's rekd cell ran with method.preset=auto on the protocol: its recorded derived values are the plan's."""
    import sweep

    catalogue = json.loads((BENCH / "results" / "quality_moco_batch.json").read_text())
    row = catalogue["rows"]["mobilenetv2_100/sup/rekd-30000-auto"]
    auto = next(v for v in _plan("rekd") if v.name == "auto")
    summary = {"recipe": {"derived": row["derived"]}}
    assert sweep.plan_check(summary, auto.as_record()) == {"ok": True, "mismatches": []}
    changed = {**row["derived"], "method.params.queue_size": {"value": 4096}}
    check = sweep.plan_check({"recipe": {"derived": changed}}, auto.as_record())
    assert not check["ok"] and check["mismatches"] == ["method.params.queue_size: planned 8192, derived 4096"]
    plus = next(v for v in _plan("rekd") if v.name == "+queue_size")
    recipe = {"recipe": {"method": {"params": {"queue_size": 8192}}}}
    assert sweep.plan_check(recipe, plus.as_record())["ok"]
    assert not sweep.plan_check({"recipe": {"method": {"params": {"queue_size": 65536}}}}, plus.as_record())["ok"]


def test_cells_go_through_the_quality_command_builder():
    import quality
    import sweep

    args = sweep.parse_args(["--methods", "rekd"])
    assert (args.budget_images, args.batch_size, args.image_size, args.cache_views) == (30_000, 64, 64, 4)
    data = {"train": "benchmarks/work/train10k", "test": "benchmarks/work/test2k", "train_images": 10_000}
    pre = {"arch": "resnet18", "mean": [0.5] * 3, "std": [0.25] * 3}
    teachers = {"sup": {"path": "t.safetensors", "arch": "resnet18", "dim": 512, "modes": {"rekd": "cached_exact"}}}
    variants = {v.name: v for v in _plan("rekd")}
    cell = sweep.sweep_cell("rekd", variants["+queue_size"], args)
    command = quality.cell_command(cell, sweep.cell_args(args, cell), data, pre, teachers, False)
    text = " ".join(command)
    assert "--set method.preset=published" in text and "--set method.params.queue_size=8192" in text
    assert "--set train.max_steps=468" in text and "--epochs 3" in text and "--batch-size 64" in text
    assert command[command.index("--out") + 1].endswith("sweep/mobilenetv2_100/sup/rekd-30000/published+queue_size=8192")
    # the same feature cache as the quality table's rekd cell
    table = {"kind": "distill", "method": "rekd", "teacher": "sup", "student": "mobilenetv2_100", "budget": 30_000,
             "preset": "auto"}
    table_command = quality.cell_command(table, args, data, pre, teachers, False)
    assert command[command.index("--cache") + 1] == table_command[table_command.index("--cache") + 1]
    auto = sweep.sweep_cell("rekd", variants["auto"], args)
    assert "--set method.preset=auto" in " ".join(quality.cell_command(auto, sweep.cell_args(args, auto), data, pre,
                                                                      teachers, False))
    assert sweep.row_key("rekd", 30_000, "+queue_size") == "rekd-30000/+queue_size"


def test_finished_table_cells_with_the_same_settings_are_reused(tmp_path, monkeypatch):
    """A sweep cell is the quality table's finished cell when that ran the same settings: the same preset without
    overrides, or (published) a cell from before method.preset whose lr and values are the published ones."""
    import quality
    import sweep

    monkeypatch.setattr(quality, "WORK", tmp_path / "work")
    monkeypatch.setattr(sweep, "WORK", tmp_path / "work")
    args = sweep.parse_args(["--methods", "mse-reg"])

    def table_cell(name: str, lr: float, preset: str | None) -> Path:
        folder = tmp_path / "work" / "quality" / "mobilenetv2_100" / "sup" / name
        folder.mkdir(parents=True, exist_ok=True)
        method = {"preset": preset} if preset else {"params": {}}
        (folder / "summary.json").write_text(json.dumps({
            "recipe": {"train": {"max_steps": 468, "lr": lr}, "method": method},
            "student": {"knn_top1": 14.6}, "train": {"steps": 468}}))
        return folder

    published = {v.name: v for v in _plan("mse-reg")}["published"]
    cell = sweep.sweep_cell("mse-reg", published, args)
    assert sweep.table_twin(cell, 468, {"train.lr": 0.05}) is None  # nothing finished
    legacy = table_cell("mse-reg-30000", 0.05, None)  # ran at the CLI's 0.05, which is mse-reg's published lr
    twin = sweep.table_twin(cell, 468, {"train.lr": 0.05})
    assert twin["dir"] == str(legacy) and twin["command_preset"] == "published"
    assert quality.cell_id(twin) == "mobilenetv2_100/sup/mse-reg-30000"
    assert sweep.table_twin(cell, 468, {"train.lr": 0.0125}) is None  # smd-like: the table's lr is not the paper's
    assert sweep.table_twin(cell, 400, {"train.lr": 0.05}) is None  # another budget
    plus = sweep.sweep_cell("mse-reg", sweep.Variant("train.lr=0.01", "published", ("train.lr=0.01",),
                                                     {"train.lr": 0.01}), args)
    assert sweep.table_twin(plus, 468, {"train.lr": 0.05}) is None  # overrides are never the table's cell
    rekd = {v.name: v for v in _plan("rekd")}
    table_cell("rekd-30000-auto", 0.0075, "auto")
    twin = sweep.table_twin(sweep.sweep_cell("rekd", rekd["auto"], args), 468, {"train.lr": 0.03})
    assert twin is not None and quality.cell_id(twin) == "mobilenetv2_100/sup/rekd-30000-auto"
    assert sweep.table_twin(sweep.sweep_cell("rekd", rekd["published"], args), 468, {"train.lr": 0.03}) is None


# --- render -----------------------------------------------------------------------------------------

def _sweep_row(method: str, variant: str, knn: float | None, lr: float, factors: dict, sets: list[str],
               preset: str = "published", source: str = "auto", status: str = "done") -> dict:
    row = {"method": method, "budget": 6400, "variant": variant, "preset": preset, "knn_top1": knn,
           "linear_top1": None if knn is None else knn + 1, "lr": lr, "factors": factors, "overrides": sets,
           "source": source, "status": status, "train_wall_s": 100.0, "kind": "distill", "teacher": "sup",
           "command": f"distillctl run --method {method} --set method.preset={preset}"
                      + "".join(f" --set {s}" for s in sets)}
    return row if status == "done" else {**row, "error": "distillctl run exited 1: boom"}


def _fake_sweep(directory: Path) -> None:
    q = {"queue": {"method.params.queue_size": 8192}, "momentum": {"method.params.momentum": 0.99},
         "lr": {"train.lr": 0.0075}}
    rows = [_sweep_row("rekd", "published", 15.0, 0.03, {}, [], source="published"),
            _sweep_row("rekd", "auto", 24.0, 0.0075, {**q["queue"], **q["momentum"], **q["lr"]}, [], preset="auto"),
            _sweep_row("rekd", "+queue_size", 22.0, 0.03, q["queue"], ["method.params.queue_size=8192"]),
            _sweep_row("rekd", "+momentum", 14.0, 0.03, q["momentum"], ["method.params.momentum=0.99"]),
            _sweep_row("rekd", "+train.lr", None, 0.0075, q["lr"], ["train.lr=0.0075"], status="failed"),
            _sweep_row("rekd", "auto-queue_size", 16.5, 0.0075, {**q["momentum"], **q["lr"]},
                       ["method.params.queue_size=65536"], preset="auto", source="leave-one-out"),
            _sweep_row("rekd", "auto-momentum", 25.0, 0.0075, {**q["queue"], **q["lr"]},
                       ["method.params.momentum=0.999"], preset="auto", source="leave-one-out"),
            _sweep_row("smd", "published", 18.0, 0.0125, {}, [], source="published"),
            _sweep_row("smd", "auto", 27.5, 0.0125, {"method.params.warmup_epochs": 0.06}, [], preset="auto"),
            _sweep_row("smd", "train.lr=0.004", 19.0, 0.004, {"train.lr": 0.004}, ["train.lr=0.004"], source="grid"),
            {**_sweep_row("smd", "train.lr=0.5", None, 0.5, {"train.lr": 0.5}, ["train.lr=0.5"], source="grid",
                          status="failed"), "lr": None,
             "error": "distillctl run exited 1: error: non-finite loss (nan) at step 11 (epoch 0); the last good "
                      "checkpoint is kept"}]
    plans = {"rekd-6400": {"method": "rekd", "budget": 6400, "command": "python benchmarks/sweep.py --methods rekd",
                           "variants": [{"name": n} for n in ("published", "auto", "+momentum", "+queue_size",
                                                              "+train.lr", "train.lr=0.09")]},
             "smd-6400": {"method": "smd", "budget": 6400, "command": "python benchmarks/sweep.py --methods smd --grid x",
                          "variants": [{"name": n} for n in ("published", "auto", "train.lr=0.004", "train.lr=0.5")]}}
    sweep = {"benchmark": "sweep", "plans": plans, "commands": ["python benchmarks/sweep.py --methods rekd"],
             "rows": {f"{r['method']}-6400/{r['variant']}": r for r in rows}}
    (directory / "sweep.json").write_text(json.dumps(sweep))


def _fake_table(directory: Path) -> None:
    """test_benchmarks' quality.json (random-init 25.0, best SSL-only mocov2 28.0 at 6,400) with a weak smd cell
    (swept) and a weak disco cell (not swept)."""
    from test_benchmarks import _fake_results

    _fake_results(directory)
    quality = json.loads((directory / "quality.json").read_text())
    base = {"kind": "distill", "teacher": "sup", "student": "mobilenetv2_100", "status": "done", "budget": 6400,
            "train_wall_s": 10.0, "images_per_sec": 100.0}
    quality["rows"]["f"] = {**base, "id": "f", "method": "smd", "knn_top1": 20.0, "linear_top1": 21.0,
                            "command": "distillctl run --method smd --out x"}
    quality["rows"]["g"] = {**base, "id": "g", "method": "disco", "knn_top1": 26.0, "linear_top1": 27.0,
                            "command": "distillctl run --method disco --out y"}
    (directory / "quality.json").write_text(json.dumps(quality))


def smd_part(section: str) -> str:
    return section[section.index("### smd"):section.index("Not swept yet")]


def test_render_sweep_section(tmp_path):
    import render

    results = tmp_path / "results"
    results.mkdir()
    _fake_table(results)
    _fake_sweep(results)
    text = render.render(results, tmp_path / "RESULTS.md", plots_enabled=False, measured=None, readme=None)
    section = text[text.index("## What moves the weak methods (issue 16 §2)"):text.index("## Dense features")]
    assert "against the random-init student of the table above (25.0 %)" in section
    rekd = section[section.index("### rekd, 6,400 images"):section.index("### smd")]
    assert "| published | published | – | 0.03 | 15.0 | 16.0 | 0.0 | -10.0 | 100 |" in rekd
    assert "| auto (momentum 0.99; queue_size 8192; train.lr 0.0075) | auto | – | 0.0075 | 24.0 | 25.0 | +9.0 | " \
           "-1.0 | 100 |" in rekd
    assert "| +queue_size | published | `method.params.queue_size=8192` | 0.03 | 22.0 | 23.0 | +7.0 | -3.0 | 100 |" in rekd
    assert "| +momentum | published | `method.params.momentum=0.99` | 0.03 | 14.0 | 15.0 | -1.0 | -11.0 | 100 |" in rekd
    assert "| +train.lr (failed) | published | `train.lr=0.0075` | 0.0075 | – |" in rekd and "boom" in rekd
    assert ("Largest gain over `published` (15.0 %): **queue_size = 8192 (its auto value)**, +7.0 points kNN "
            "(→ 22.0 %, -3.0 vs random-init). `auto` (all 3 derived values together): +9.0 points. `auto` with one "
            "derived value back at the paper's (24.0 % with all): without queue_size -7.5, without momentum +1.0.") in rekd
    assert "| auto-queue_size | auto | `method.params.queue_size=65536` | 0.0075 | 16.5 |" in rekd
    assert "Not run yet: train.lr=0.09; failed: +train.lr — `python benchmarks/sweep.py --methods rekd` runs them" in rekd
    assert "Not run yet" not in smd_part(section) and "failed:" not in smd_part(section)
    smd = section[section.index("### smd, 6,400 images"):]
    # one derived key: `auto` is that key's variant, and the verdict names it
    assert ("Largest gain over `published` (18.0 %): **warmup_epochs = 0.06 (its auto value)**, +9.5 points kNN "
            "(→ 27.5 %, +2.5 vs random-init).") in smd
    assert "| train.lr=0.004 | published | `train.lr=0.004` | 0.004 | 19.0 | 20.0 | +1.0 | -6.0 | 100 |" in smd
    # a cell stopped by the non-finite-loss guard is a result (diverged), not a failure to rerun
    assert ("| train.lr=0.5 (diverged) | published | `train.lr=0.5` | 0.5 | – | – | – | – | non-finite loss (nan) at "
            "step 11") in smd
    assert "Diverged (the loss became non-finite; a rerun diverges again, this is the result): train.lr=0.5." in smd
    # the quality table's own smd cell (before method.preset: the CLI's lr 0.05) as context
    assert "| the quality table's cell (context, not a sweep variant) | published (before method.preset) | – | 0.05 | " \
           "20.0 | 21.0 | +2.0 | -5.0 | 10 |" in smd
    # disco is below the best SSL-only student and has no sweep: named with the command that sweeps it
    assert ("Not swept yet, below the random-init student (25.0 %) or the best SSL-only student (mocov2 28.0 %) at "
            "6,400 images in the table above: disco (26.0 %). Command: `python benchmarks/sweep.py --methods disco "
            "--budget-images 6400 --suspects --jobs 2 --threads 1`") in section
    assert "seed (30.0 %)" not in section  # above both bars
    assert "distillctl run --method rekd --set method.preset=published --set method.params.queue_size=8192" in section
    note = text[text.index("## Closing note"):text.index("## Machine")]
    assert "- What moves the weak methods (one-factor sweeps): rekd at 6,400: Largest gain over `published` (15.0 %): " \
           "**queue_size = 8192 (its auto value)**" in note
    # deterministic: the same inputs render the same text
    assert render.render(results, tmp_path / "again.md", plots_enabled=False, measured=None, readme=None) == text


def test_render_without_sweeps_names_the_commands(tmp_path):
    import render

    results = tmp_path / "results"
    results.mkdir()
    _fake_table(results)
    text = render.render(results, tmp_path / "RESULTS.md", plots_enabled=False, measured=None, readme=None)
    section = text[text.index("## What moves the weak methods"):text.index("## Dense features")]
    assert "disco (26.0 %), smd (20.0 %)" not in section  # weakest first
    assert ": smd (20.0 %), disco (26.0 %). Command: `python benchmarks/sweep.py --methods disco,smd --budget-images " \
           "6400 --suspects --jobs 2 --threads 1`" in section
    assert "What moves the weak methods (one-factor sweeps)" not in text  # no verdict without a sweep
    empty = render.render(tmp_path, tmp_path / "E.md", plots_enabled=False, measured=None, readme=None)
    assert "No sweep has run yet: `python benchmarks/sweep.py --methods METHOD --suspects`" in empty


# --- the script -------------------------------------------------------------------------------------

def _run(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "sweep.py"), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=timeout)


def test_dry_run_prints_commands_and_estimate(tmp_path):
    shared = _shared(tmp_path, "resnet18", real_teacher=False)
    env = _env(tmp_path, shared)
    proc = _run("--methods", "smd,rekd", "--grid", "train.lr=0.01", "--dry-run", "--threads", "1", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    commands = [line for line in lines if line.startswith("distillctl run ")]
    # smd: published, auto, five one-key variants (its short-run settings), lr 0.01; rekd: published, auto, four
    # one-key variants, lr 0.01
    assert len(commands) == 15
    assert sum("--method smd " in c for c in commands) == 8 and sum("--method rekd " in c for c in commands) == 7
    assert any("rekd-30000/published+queue_size=8192" in c and "--set method.params.queue_size=8192" in c
               for c in commands)
    assert lines[-1].startswith("# estimate: 15 cells to run (smd 8, rekd 7), ~") and " h one at a time" in lines[-1]
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()  # a dry run makes nothing
    bad = _run("--methods", "smd", "--grid", "method.params.queue_size=1024", "--dry-run", env=env)
    assert bad.returncode == 2 and "none of smd has a param 'queue_size'" in bad.stderr and "Traceback" not in bad.stderr
    unknown = _run("--methods", "nope", "--dry-run", env=env)
    assert unknown.returncode == 2 and "nope" in unknown.stderr and "Traceback" not in unknown.stderr
    # --variants: only the named planned variants run; a name no method plans is one line, exit 2
    some = _run("--methods", "smd,rekd", "--variants", "published,+queue_size", "--dry-run", "--threads", "1", env=env)
    assert some.returncode == 0, some.stderr
    chosen = [line for line in some.stdout.splitlines() if line.startswith("distillctl run ")]
    assert len(chosen) == 3 and sum("/published " in c for c in chosen) == 2  # smd has no queue: no +queue_size
    assert sum("rekd-30000/published+queue_size=8192" in c for c in chosen) == 1
    typo = _run("--methods", "smd", "--variants", "published,+queue", "--dry-run", env=env)
    assert typo.returncode == 2 and "--variants +queue: not planned; planned: " in typo.stderr
    assert "Traceback" not in typo.stderr


@pytest.mark.slow
def test_quick_sweep_runs_and_resumes(tmp_path):
    """seed on tiny data: the published and the auto cell (its queue bounded by the 64 images seen) run for real with
    a real teacher; a second invocation finds both finished, and another method's rows are kept."""
    shared = _shared(tmp_path, "resnet10t", real_teacher=True)
    env = _env(tmp_path, shared)
    args = ["--methods", "seed", "--quick", "--threads", "1", "--students", "test_resnet", "--budget-images", "64",
            "--batch-size", "16", "--no-linear"]
    out = tmp_path / "results" / "sweep_quick.json"
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps({"rows": {"smd-64/published": {"method": "smd", "variant": "published"}}}))
    proc = _run(*args, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == {"seed-64/published", "seed-64/auto", "smd-64/published"}
    published, auto = rows["seed-64/published"], rows["seed-64/auto"]
    assert published["status"] == auto["status"] == "done"
    assert published["preset"] == "published" and auto["preset"] == "auto"
    assert auto["factors"] == {"method.params.queue_size": 64} and auto["plan_check"]["ok"], auto["plan_check"]
    assert auto["derived"]["method.params.queue_size"]["value"] == 64  # the run derived what the plan said
    assert published["derived"]["method.params.queue_size"]["value"] == 65536
    for row in (published, auto):
        assert 0 <= row["knn_top1"] <= 100 and row["steps"] == 4 and row["command"].startswith("distillctl run ")
    assert [v["name"] for v in result["plans"]["seed-64"]["variants"]] == ["published", "auto"]
    again = _run(*args, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert ": distillctl " not in again.stderr  # both cells were found finished
    assert json.loads(out.read_text())["rows"] == rows


def test_help_and_missing_shared(tmp_path):
    proc = _run("--help", env={})
    assert proc.returncode == 0 and "Example" in proc.stdout and "--suspects" in proc.stdout
    missing = _run("--methods", "smd", env={"DISTILLCTL_SHARED": str(tmp_path / "nowhere"),
                                            "DISTILLCTL_BENCH_WORK": str(tmp_path / "work"),
                                            "DISTILLCTL_BENCH_RESULTS": str(tmp_path / "results")})
    assert missing.returncode == 2 and "benchmark inputs missing" in missing.stderr
    assert not (tmp_path / "work").exists()


def test_a_plan_records_the_command_that_runs_its_cells_not_the_collect_pass():
    import sweep

    argv = ["--methods", "smd", "--grid", "train.lr=0.09", "--collect"]
    assert sweep.invocation(argv, runs=True) == "python benchmarks/sweep.py --methods smd --grid train.lr=0.09"
    assert sweep.invocation(argv).endswith("--collect")
    # a --variants selection runs part of the plan: the plan's command runs all of it
    chosen = ["--methods", "smd", "--variants", "published", "--budget-images", "120000", "--variants=auto"]
    assert sweep.invocation(chosen, runs=True) == "python benchmarks/sweep.py --methods smd --budget-images 120000"
    assert "--variants published" in sweep.invocation(chosen)


def test_a_grid_value_the_method_refuses_is_a_usage_error_before_any_cell():
    """A --grid value outside the method's Params (smd augmentation=foo) stops the sweep with one line (exit 2)
    instead of a traceback from the cache-key builder or a failed cell; accepted values pass."""
    import sweep

    ok = {"smd": (_plan("smd", ["method.params.augmentation=weak", "method.params.times=0.1"]), {})}
    sweep.params_valid(ok)
    bad = {"smd": (_plan("smd", ["method.params.augmentation=foo"]), {})}
    with pytest.raises(sweep.SweepUsage, match=r"method.params.augmentation: invalid value 'foo' for method smd"):
        sweep.params_valid(bad)


def test_set_values_read_back_as_written():
    """``fmt``: the --set text YAML reads back as the same value; a plain word goes bare (it names the cell's
    folder), a word YAML would read as something else keeps its quotes."""
    import sweep

    from distillctl.config import parse_set

    for value, text in [(8192, "8192"), (0.0075, "0.0075"), (5e-05, "0.00005"), (True, "true"), ("batch", "batch"),
                        ("weak", "weak"), ("yes", '"yes"'), ("null", '"null"'), ("1e3", '"1e3"'), ("a b", '"a b"')]:
        assert sweep.fmt(value) == text
        assert parse_set([f"method.params.x={text}"])["method.params.x"] == value


def test_a_row_under_an_older_grid_name_counts_for_the_plan_variant_with_its_settings():
    """smd's 120,000-image sweep recorded published + center=batch as `center=batch` before the plan named it
    `+center`: the row fills that variant (labelled with both names) instead of showing it as not run; a row whose
    settings no variant has stays under its own name."""
    import render

    def row(variant, preset, overrides, knn):
        return {"method": "smd", "budget": 6400, "variant": variant, "preset": preset, "overrides": overrides,
                "status": "done", "knn_top1": knn, "linear_top1": knn, "train_wall_s": 10.0, "lr": 0.0125}

    plan = {"method": "smd", "budget": 6400, "command": "python benchmarks/sweep.py --methods smd",
            "variants": [{"name": "published", "preset": "published", "sets": []},
                         {"name": "+center", "preset": "published", "sets": ["method.params.center=batch"]},
                         {"name": "+times", "preset": "published", "sets": ["method.params.times=0.0"]}]}
    rows = [row("published", "published", [], 15.0), row("center=batch", "published", ["method.params.center=batch"], 23.0),
            row("times=0.1", "published", ["method.params.times=0.1"], 12.0)]
    text = "\n".join(render.sweep_group(plan, rows, [], 20.0))
    assert "| +center (run as center=batch) | published | `method.params.center=batch` | 0.0125 | 23.0 | 23.0 | +8.0 |" in text
    assert "| times=0.1 | published | `method.params.times=0.1` |" in text
    assert text.index("+center (run as") < text.index("times=0.1")  # in plan order, extra rows after
    assert "Not run yet: +times —" in text and "+center," not in text


# --- from the SSL teacher (issue 16 §4) -------------------------------------------------------------

def _ssl_teacher_run(work: Path, knn: float | None) -> Path:
    """quality.py's pretrained SSL teacher folder (finished when ``knn`` is given)."""
    folder = work / "quality" / "ssl-teacher" / "simclr-resnet18-1000000-auto"
    (folder / "student").mkdir(parents=True)
    summary = {"student": {"knn_top1": knn}, "eval": {"student": {"linear": {"top1": None if knn is None else knn + 4}}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_ssl_teacher_cells_distil_from_the_pretrained_teacher(tmp_path, monkeypatch):
    import quality
    import sweep

    monkeypatch.setattr(quality, "WORK", tmp_path / "work")
    monkeypatch.setattr(sweep, "WORK", tmp_path / "work")
    args = sweep.parse_args(["--methods", "dlkd", "--budget-images", "120000", "--online", "dlkd",
                             "--ssl-teacher", "simclr:resnet18:1000000", "--grid", "train.lr=0.1"])
    with pytest.raises(sweep.SweepUsage, match="has not been pretrained .* python benchmarks/quality.py --methods none "
                                               "--ssl-methods none --ssl-teacher simclr:resnet18:1000000"):
        sweep.ssl_teacher_entry(args)
    assert sweep.ssl_teacher_entry(args, require=False)["knn_top1"] is None  # the dry run prints its plan anyway
    folder = _ssl_teacher_run(tmp_path / "work", None)
    with pytest.raises(sweep.SweepUsage):  # a teacher still training is not a teacher yet
        sweep.ssl_teacher_entry(args)
    (folder / "summary.json").write_text(json.dumps({"student": {"knn_top1": 58.2},  # as distillctl pretrain writes it
                                                     "eval": {"student": {"linear": {"top1": 62.75}}}}))
    entry = sweep.ssl_teacher_entry(args)
    assert (entry["knn_top1"], entry["linear_top1"], entry["spec"]) == (58.2, 62.75, "simclr:resnet18:1000000")
    assert entry["path"] == str(folder / "student" / "model.safetensors") and entry["arch"] == "resnet18"
    data = {"train": "benchmarks/work/train10k", "test": "benchmarks/work/test2k", "train_images": 10_000}
    pre = {"arch": "resnet18", "mean": [0.5] * 3, "std": [0.25] * 3}
    teachers = {"sup": {"path": "t.safetensors", "arch": "resnet18", "dim": 512, "modes": {"dlkd": "cached_exact"}},
                "ssl": {**entry, "modes": {"dlkd": "cached_exact"}}}
    variants = {v.name: v for v in _plan("dlkd", ["train.lr=0.1"], size=(10_000, 64, 120_000))}
    assert list(variants) == ["published", "train.lr=0.1"]  # auto derives dlkd's published values at this size
    cell = sweep.sweep_cell("dlkd", variants["train.lr=0.1"], args)
    assert cell["teacher"] == "ssl"
    command = quality.cell_command(cell, sweep.cell_args(args, cell), data, pre, teachers, False)
    assert command[command.index("--teacher") + 1] == entry["path"]
    assert command[command.index("--out") + 1].endswith("sweep/mobilenetv2_100/ssl/dlkd-120000/published+train.lr=0.1")
    assert "--teacher-mode online" in " ".join(command) and "--cache" not in command
    assert "--set train.lr=0.1" in " ".join(command)
    assert sweep.sweep_cell("dlkd", variants["train.lr=0.1"], sweep.parse_args(["--methods", "dlkd"]))["teacher"] == "sup"
    result, _ = sweep.start_result(args, [], {**data, "test_images": 2_000}, tmp_path / "sweep_ssl_teacher.json", {"dlkd": list(variants.values())},
                                   entry)
    assert result["ssl_teacher"] == {"spec": "simclr:resnet18:1000000", "arch": "resnet18", "knn_top1": 58.2,
                                     "linear_top1": 62.75, "path": entry["path"]}  # (outside the repo: as given)
    assert result["config"]["teacher"] == entry["path"] and list(result["plans"]) == ["dlkd-120000"]


def test_published_reuses_the_table_auto_cell_where_auto_derives_the_published_values(tmp_path, monkeypatch):
    import quality
    import sweep

    monkeypatch.setattr(quality, "WORK", tmp_path / "work")
    monkeypatch.setattr(sweep, "WORK", tmp_path / "work")
    args = sweep.parse_args(["--methods", "dlkd", "--budget-images", "120000", "--ssl-teacher", "simclr:resnet18:1000000"])
    published = sweep.sweep_cell("dlkd", sweep.Variant("published", "published"), args)
    folder = tmp_path / "work" / "quality" / "mobilenetv2_100" / "ssl" / "dlkd-120000-auto"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "recipe": {"train": {"max_steps": 1875, "lr": 0.05}, "method": {"preset": "auto", "params": {}}},
        "student": {"knn_top1": 51.5}, "train": {"steps": 1875}}))
    assert sweep.table_twin(published, 1875, {"train.lr": 0.05}) is None  # auto derives something else: not the same
    twin = sweep.table_twin(published, 1875, {"train.lr": 0.05}, auto_is_published=True)
    assert quality.cell_id(twin) == "mobilenetv2_100/ssl/dlkd-120000-auto" and twin["command_preset"] == "auto"
    assert sweep.table_twin(published, 1875, {"train.lr": 0.01}, auto_is_published=True) is None  # another lr ran
    lr = sweep.sweep_cell("dlkd", sweep.Variant("train.lr=0.1", "published", ("train.lr=0.1",), {"train.lr": 0.1}), args)
    assert sweep.table_twin(lr, 1875, {"train.lr": 0.05}, auto_is_published=True) is None


def test_render_ssl_teacher_sweep(tmp_path):
    import render

    results = tmp_path / "results"
    results.mkdir()
    _fake_table(results)
    quality = json.loads((results / "quality.json").read_text())
    teacher = {"id": "t", "method": "simclr", "student": "resnet18", "budget": 1_000_000, "knn_top1": 58.2}
    base = {"kind": "distill", "teacher": "ssl", "student": "mobilenetv2_100", "status": "done", "budget": 120_000,
            "train_wall_s": 2975.0, "images_per_sec": 40.0, "preset": "auto", "lr": 0.05, "ssl_teacher_ref": teacher}
    quality["rows"]["s1"] = {**base, "id": "s1", "method": "dlkd", "knn_top1": 51.5, "linear_top1": 53.5,
                             "command": "distillctl run --method dlkd --set method.preset=auto"}
    quality["rows"]["s2"] = {**base, "id": "s2", "method": "pcd", "knn_top1": 49.35, "linear_top1": 51.7,
                             "command": "distillctl run --method pcd --set method.preset=auto"}
    (results / "quality.json").write_text(json.dumps(quality))
    row = {**_sweep_row("dlkd", "train.lr=0.1", 53.0, 0.1, {"train.lr": 0.1}, ["train.lr=0.1"], source="grid"),
           "budget": 120_000, "teacher": "ssl"}
    low = {**_sweep_row("dlkd", "train.lr=0.025", 50.0, 0.025, {"train.lr": 0.025}, ["train.lr=0.025"],
                        source="grid"), "budget": 120_000, "teacher": "ssl"}
    plan = {"method": "dlkd", "budget": 120_000, "command": "python benchmarks/sweep.py --methods dlkd --ssl-teacher s",
            "variants": [{"name": n} for n in ("published", "train.lr=0.1", "train.lr=0.025", "train.lr=0.2")]}
    sweep = {"benchmark": "sweep", "plans": {"dlkd-120000": plan}, "commands": [plan["command"]],
             "ssl_teacher": {"spec": "simclr:resnet18:1000000", "knn_top1": 58.2, "linear_top1": 62.75},
             "rows": {"dlkd-120000/train.lr=0.1": row, "dlkd-120000/train.lr=0.025": low}}
    (results / "sweep_ssl_teacher.json").write_text(json.dumps(sweep))
    text = render.render(results, tmp_path / "RESULTS.md", plots_enabled=False, measured=None, readme=None)
    section = text[text.index("## What moves distillation from the SSL teacher (issue 16 §4)"):
                   text.index("## Dense features")]
    assert "`benchmarks/sweep.py --ssl-teacher simclr:resnet18:1000000`" in section and "(kNN 58.2 %, linear 62.8 %)" \
        in section
    # the table's dlkd cell (auto, which derives the published values: the plan has no auto variant) is `published`
    assert ("| published (the quality table's cell: auto derives the published values here) | auto | – | 0.05 | 51.5 | "
            "53.5 | 0.0 | +26.5 | 2,975 |") in section
    assert "context, not a sweep variant" not in section  # shown once, as the published row
    assert "| train.lr=0.1 | published | `train.lr=0.1` | 0.1 | 53.0 | 54.0 | +1.5 | +28.0 | 100 |" in section
    assert "Largest gain over `published` (51.5 %): **train.lr = 0.1**, +1.5 points kNN" in section
    assert "Student/teacher kNN (best first): train.lr=0.1 0.911, published 0.885, train.lr=0.025 0.859." in section
    assert "Not run yet: train.lr=0.2 — `python benchmarks/sweep.py --methods dlkd --ssl-teacher s` runs them" in section
    assert "pcd" not in section  # not swept
    note = text[text.index("## Closing note"):text.index("## Machine")]
    assert ("- From the SSL teacher (simclr:resnet18:1000000, kNN 58.2%; one-factor sweep): dlkd at 120,000 images, "
            "best variant `train.lr=0.1`: kNN 53.0% (student/teacher **0.91**).") in note
    # without the SSL-teacher sweep file, neither the section nor the note
    (results / "sweep_ssl_teacher.json").unlink()
    text = render.render(results, tmp_path / "RESULTS.md", plots_enabled=False, measured=None, readme=None)
    assert "What moves distillation from the SSL teacher" not in text and "From the SSL teacher (" not in text
