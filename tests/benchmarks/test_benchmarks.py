"""Smoke tests of the benchmark scripts: --help, the missing-../shared exit, cell planning, and that
render.py builds RESULTS.md (tables, ratios, plots) from tiny fake JSON results. No benchmark runs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
SCRIPTS = ["quality.py", "speed.py", "export_bench.py", "run_all.py", "render.py", "gpu_check.py"]
sys.path.insert(0, str(BENCH))


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    proc = _run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Example" in proc.stdout


@pytest.mark.parametrize("script", ["quality.py", "speed.py", "export_bench.py", "run_all.py"])
def test_missing_shared_exits_2(script, tmp_path):
    proc = _run(script, env={"DISTILLCTL_SHARED": str(tmp_path / "nowhere"),
                             "DISTILLCTL_BENCH_WORK": str(tmp_path / "work"),
                             "DISTILLCTL_BENCH_RESULTS": str(tmp_path / "results")})
    assert proc.returncode == 2
    assert "benchmark inputs missing" in proc.stderr and "../shared" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_distillctl_helper_reads_json_and_logs_stderr(tmp_path):
    """Cells' stdout goes to a temp file (not a pipe a killed suite would leave without a reader)."""
    from common import BenchError, distillctl

    listing = distillctl(["methods", "list"], tmp_path / "cell.log")
    assert "simreg" in {m["name"] for m in listing["methods"]}
    assert (tmp_path / "cell.log").read_text().startswith("$ ")
    with pytest.raises(BenchError, match="exited 2"):
        distillctl(["methods", "show", "no-such-method"], tmp_path / "bad.log")


def test_plan_cells_follows_the_registry():
    import quality

    methods = [{"name": "simreg", "kind": "distill", "teacher_mode": "cached_exact"},
               {"name": "zeta", "kind": "distill", "teacher_mode": "online"},
               {"name": "multi", "kind": "distill", "teacher_mode": "? (UsageError)"},
               {"name": "mocov2", "kind": "ssl", "teacher_mode": "none"}]
    args = quality.parse_args(["--budget-images", "6400", "--extra", "simreg=120000", "--first", "zeta"])
    cells = quality.plan_cells(args, methods)
    names = [(c["method"], c["budget"]) for c in cells]
    assert names == [("zeta", 6400), ("simreg", 6400), ("mocov2", 6400), ("simreg", 120000)]
    assert quality.cell_id(cells[0]) == "mobilenetv2_100/sup/zeta-6400-auto"  # cells carry their method.preset
    assert quality.schedule(120_000, 64, 10_000) == (1875, 13)
    with pytest.raises(quality.BenchError):
        quality.plan_cells(quality.parse_args(["--methods", "nope"]), methods)
    # --extra cells for methods left out of --methods (a full small-budget table beside long cells); the
    # multi-teacher method is left out of the one-teacher table; --first orders across kinds
    methods.append({"name": "pair", "kind": "distill", "teacher_mode": "cached_exact", "teachers": "2+"})
    args = quality.parse_args(["--budget-images", "120000", "--methods", "simreg", "--ssl-methods", "none",
                               "--extra", "zeta=30000", "--extra", "mocov2=30000", "--extra", "simreg=30000",
                               "--first", "simreg,mocov2"])
    names = [(c["method"], c["budget"]) for c in quality.plan_cells(args, methods)]
    assert names == [("simreg", 30000), ("mocov2", 30000), ("zeta", 30000), ("simreg", 120000)]
    with pytest.raises(quality.BenchError):
        quality.plan_cells(quality.parse_args(["--extra", "pair=30000"]), methods)


def test_spread():
    from common import spread

    assert spread([3, 1, 2, None]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([])["median"] is None


def _fake_results(directory: Path) -> None:
    machine = {"cpu_model": "Fake CPU", "cores": 2, "ram_gib": 8.0, "gpu": None, "load_average": [1.0, 1.0, 1.0],
               "platform": "Linux", "versions": {"torch": "0"}, "git_commit": "abc", "date_utc": "2026-01-01 00:00 UTC"}
    row = {"kind": "distill", "teacher": "sup", "student": "mobilenetv2_100", "status": "done", "train_wall_s": 10.0,
           "images_per_sec": 100.0, "teacher_mode": "cached", "command": "distillctl run --method X"}
    rows = {
        "a": {**row, "id": "a", "method": "simreg", "budget": 6400, "knn_top1": 40.0, "linear_top1": 45.0},
        "b": {**row, "id": "b", "method": "seed", "budget": 6400, "knn_top1": 30.0, "linear_top1": 35.0},
        "c": {**row, "id": "c", "method": "simreg", "budget": 120000, "knn_top1": 50.0, "linear_top1": 55.0},
        "d": {**row, "id": "d", "method": "mocov2", "kind": "ssl", "teacher": None, "budget": 6400, "knn_top1": 28.0,
              "linear_top1": 30.0, "teacher_mode": "none",
              "collapse": {"step": 60, "embedding_cos": 0.99, "threshold": 0.95}},
        "e": {**row, "id": "e", "method": "bingo", "budget": 6400, "status": "failed", "error": "exit 1: boom"},
        "f": {**row, "id": "f", "method": "smd", "budget": 6400, "knn_top1": 20.0, "linear_top1": 21.0,
              "collapse": {"step": 20, "embedding_cos": 0.99, "threshold": 0.95, "recovered_at_step": 1500,
                           "last_embedding_cos": 0.6}},
    }
    quality = {"command": "python benchmarks/quality.py --budget-images 6400", "machine": machine, "rows": rows,
               "config": {"budget_images": 6400, "extra_budgets": {"simreg": [120000]}, "batch_size": 64,
                          "image_size": 64, "cache_views": 4, "seed": 0, "students": "mobilenetv2_100",
                          "train_images": 10000, "test_images": 2000, "data": {"train": "train10k", "test": "test2k"},
                          "teacher": {"file": "t.safetensors"}},
               "reference": {"teacher_knn": {"sup": 80.0}, "teacher_linear": {"linear_top1": 85.0},
                             "random": {"knn_top1": 25.0, "linear_top1": 27.0}},
               "elapsed_s": 600, "started_utc": "s", "finished_utc": "f"}
    spread = lambda m: {"median": m, "min": m - 1, "max": m + 1, "n": 3}  # noqa: E731
    speed = {"command": "python benchmarks/speed.py", "machine": machine, "elapsed_s": 60,
             "config": {"log_every": 5, "batch_size": 64, "steps": 30, "repeats": 3},
             "loop": {"bare_summary": spread(200.0), "summary": {
                 "simreg/cached": {"images_per_sec": spread(150.0), "ratio_loop_over_bare": spread(0.75),
                                   "peak_rss_mib": spread(900.0), "errors": []},
                 "simreg/online": {"images_per_sec": spread(100.0), "ratio_loop_over_bare": spread(0.5),
                                   "peak_rss_mib": spread(950.0), "errors": []},
                 "simreg/online_over_cached": {"epoch_time_ratio": spread(1.5)}}},
             "scaling": {"method": "simreg", "mode": "online", "sizes": {
                 "2000": {"epoch_s": 10.0, "images_per_sec": 200.0, "process_wall_s": 20.0, "peak_rss_mib": 900.0},
                 "8000": {"epoch_s": 40.0, "images_per_sec": 200.0, "process_wall_s": 50.0, "peak_rss_mib": 950.0}}}}
    export = {"run": "benchmarks/work/quality/x", "bench_command": "distillctl bench x", "export_command": "distillctl export x",
              "int8_accuracy": {"reference_top1": 50.0, "candidate_top1": 49.5, "drop": 0.5},
              "parity": {"onnx": {"max_abs": 1e-5, "min_cosine": 0.99999, "passed": True}},
              "latency": {"torch@1": {"format": "torch", "batch": 1, "p50_ms": spread(10.0), "p90_ms": spread(12.0),
                                      "images_per_sec": spread(100.0), "size_mb": 9.0},
                          "onnx-int8@1": {"format": "onnx-int8", "batch": 1, "p50_ms": spread(4.0), "p90_ms": spread(5.0),
                                          "images_per_sec": spread(250.0), "size_mb": 3.0,
                                          "speedup_vs_torch": spread(2.5), "speedup_vs_onnx_fp32": spread(1.6)}}}
    for name, data in (("quality.json", quality), ("speed.json", speed), ("export.json", export)):
        (directory / name).write_text(json.dumps(data))


def test_render_from_fake_results(tmp_path):
    import render

    results = tmp_path / "results"
    results.mkdir()
    _fake_results(results)
    out = tmp_path / "RESULTS.md"
    text = render.render(results, out)
    assert out.read_text() == text
    # best method at the common budget, its ratio to the teacher and gain over the best SSL-only student
    assert "**simreg**, kNN 40.0% (teacher 80.0%, student/teacher **0.50**)" in text
    assert "gain over the best SSL-only student at the same budget (mocov2, 28.0%): **+12.0 points**" in text
    assert "simreg at 120,000 images (lr 0.05): kNN 50.0%" in text  # with the lr it trained at (CLI default)
    assert "| bingo (failed) |" in text and "boom" in text
    assert "| mocov2 (collapsed at step 60) | ssl |" in text  # distillctl's collapse watch fired in that cell
    assert "| smd (collapsed at step 20, recovered by step 1,500) | distill |" in text
    assert "| simreg | distill |" in text  # no note where it did not
    assert "simreg cached 0.75" in text and "simreg online 0.50" in text
    assert "2.50 [1.50–3.50] (n=3)× vs PyTorch eager" in text
    assert "drop 0.50 points" in text
    assert "No GPU was lent" in text
    assert "Fake CPU, 2 cores, 8.0 GiB RAM" in text
    assert (tmp_path / "quality_budget.png").stat().st_size > 1000
    assert (tmp_path / "epoch_time_vs_size.png").stat().st_size > 1000


def test_full_table_budget_is_the_one_with_most_cells():
    import render

    def row(method, budget, knn, kind="distill"):
        return {"method": method, "budget": budget, "knn_top1": knn, "kind": kind, "status": "done",
                "teacher": "sup" if kind == "distill" else None}

    q = {"config": {"budget_images": 120000, "students": "mobilenetv2_100"},
         "reference": {"teacher_knn": {"sup": 80.0}},
         "rows": {"a": row("simreg", 120000, 50.0), "b": row("simreg", 30000, 35.0), "c": row("seed", 30000, 30.0),
                  "d": row("mocov2", 30000, 20.0, "ssl")}}
    facts = render.quality_facts(q)
    assert facts["budget"] == 30000 and facts["best"]["method"] == "simreg" and facts["gain"] == 15.0
    assert [r["knn_top1"] for r in facts["long"][120000]["distill"]] == [50.0]
    note = render.summary_section(facts, {}, {}, q)
    assert "Best method at 30,000 images (the full table, 2 distillation methods): **simreg**" in note
    assert "simreg at 120,000 images: kNN 50.0% (student/teacher 0.62) vs 42.3%" in note


def test_render_without_results(tmp_path):
    import render

    text = render.render(tmp_path, tmp_path / "RESULTS.md")
    assert "run `python benchmarks/quality.py`" in text and "run `python benchmarks/speed.py`" in text


def test_train_time_of_a_resumed_cell(tmp_path):
    from quality import train_time

    metrics = tmp_path / "metrics.jsonl"
    lines = [{"stage": "distill", "step": s, "img_per_s": 10.0} for s in (10, 20, 30)]  # first invocation
    lines += [{"stage": "distill", "step": s, "img_per_s": 20.0} for s in (30, 40)]  # resumed at 25: 30 re-run
    lines += [{"stage": "eval", "step": 40}]
    metrics.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    resumed = {"resumed_from_step": 25, "global_batch": 4, "wall_s": 3.0, "total_wall_s": None}
    # steps 0-20 at 10 img/s (8 s), 20-40 at 20 img/s (4 s)
    assert train_time(resumed, metrics) == {"train_wall_s": 12.0, "train_wall_estimated": True}
    recorded = {**resumed, "total_wall_s": 11.5}
    assert train_time(recorded, metrics) == {"train_wall_s": 11.5, "train_wall_estimated": False}
    fresh = {"resumed_from_step": None, "wall_s": 7.0}
    assert train_time(fresh, metrics) == {"train_wall_s": 7.0, "train_wall_estimated": False}


def test_geometry_measures_against_loops():
    import torch

    import geometry

    torch.manual_seed(0)
    rows = torch.randn(7, 5, dtype=torch.float64)
    unit = [r / r.norm() for r in rows]
    loop = sum(float(unit[i] @ unit[j]) for i in range(7) for j in range(7) if i != j) / 42
    assert geometry.pair_cos(rows) == pytest.approx(loop, abs=1e-12)
    # 1-NN: two tight clusters, one point labelled against its cluster
    points = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, -0.1], [0.0, 1.0], [0.1, 0.99], [-0.1, 0.98]])
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    assert geometry.nn1_accuracy(points, labels) == pytest.approx(100 * 5 / 6)  # only the mislabelled point misses
    teacher = torch.rand(6, 4) + 0.1
    unit_teacher = teacher / teacher.norm(dim=1, keepdim=True)
    collapsed = unit_teacher.mean(dim=0, keepdim=True).repeat(6, 1)  # the teacher's mean direction for every image
    head = geometry.head_geometry(collapsed, teacher, labels)
    assert head["pair_cos"] == pytest.approx(1.0) and head["cos_to_teacher_mean"] == pytest.approx(1.0)
    own = geometry.head_geometry(teacher, teacher, labels)
    assert own["cos_to_teacher"] == pytest.approx(1.0)
    assert head["cos_to_teacher"] == pytest.approx(own["cos_to_teacher_mean"])  # what the mean alone scores


def test_geometry_section_reads_the_rows(tmp_path):
    import render

    teacher = {"pair_cos": 0.29, "nn1": 81.5, "cos_to_own_mean": 0.54}
    rows = {"a": {"method": "smd", "knn_top1": 16.4, "backbone": {"pair_cos": 0.69, "nn1": 14.7},
                  "head": {"pair_cos": 0.997, "nn1": 12.0, "cos_to_teacher": 0.534, "cos_to_teacher_mean": 0.988}},
            "b": {"method": "cosine-reg", "knn_top1": 48.3, "backbone": {"pair_cos": 0.44, "nn1": 39.2},
                  "head": {"pair_cos": 0.57, "nn1": 35.0, "cos_to_teacher": 0.727, "cos_to_teacher_mean": 0.753}},
            "c": {"method": "dlkd", "knn_top1": 68.0, "backbone": {"pair_cos": 0.3, "nn1": 60.0}, "head": None}}
    text = render.geometry_section({"command": "python benchmarks/geometry.py", "images": 1000, "budget": 120000,
                                    "collapse_threshold": 0.95, "teacher": teacher, "rows": rows})
    lines = text.splitlines()
    smd = next(line for line in lines if line.startswith("| smd |"))
    assert "collapsed onto the teacher's mean direction" in smd and "(0.534)" in smd and "(0.540)" in smd
    assert next(line for line in lines if line.startswith("| cosine-reg |")).endswith("| – |")  # healthy
    rows["b"]["head"].update(pair_cos=0.8)  # mse-reg-like: concentrated, nearer the mean than its targets
    concentrated = render.geometry_section({"command": "x", "images": 10, "budget": 1, "collapse_threshold": 0.95,
                                            "teacher": teacher, "rows": rows})
    assert "mostly the teacher's average is fitted" in concentrated
    assert next(line for line in lines if line.startswith("| dlkd |")).endswith("| – | – | – | – |")
    assert [line.split(" |")[0] for line in lines if line.startswith("| ") and not line.startswith("| teacher (")][1:] == \
        ["| smd", "| cosine-reg", "| dlkd"]  # weakest first
    assert render.geometry_section(None) == ""
    # the table has measured cell "a" again since: the row is the earlier run's, with the table's number beside it
    table = {"rows": {"a": {"status": "done", "knn_top1": 42.1}, "b": {"status": "done", "knn_top1": 48.3}}}
    again = render.geometry_section({"command": "x", "images": 10, "budget": 1, "collapse_threshold": 0.95,
                                     "teacher": teacher, "rows": rows}, table).splitlines()
    assert any(line.startswith("| smd (an earlier run of this cell; the table's cell now: 42.1 %) | 16.4 |")
               for line in again)
    assert any(line.startswith("| cosine-reg | 48.3 |") for line in again)


def test_a_finished_cell_under_an_older_derivation_is_stale():
    """A cell that ran before a derivation was added (protocpc's auto out_dim) is not what its command runs now:
    quality.finished must not reuse it. Explicit keys and values derived the same way keep a cell."""
    import quality

    def summary(preset, params, derived):
        return {"data": {"images": 10_000}, "recipe": {
            "method": {"name": "protocpc", "preset": preset, "params": params},
            "train": {"batch_size": 64, "max_steps": 1875, "optimizer": "sgd"},
            "derived": {key: {"value": value} for key, value in derived.items()}}}

    old_auto = summary("auto", {}, {"train.lr": None})
    assert quality.stale_derivation(old_auto) == "method.params.out_dim: 65536 → 512"
    old_published = summary("published", {}, {"train.lr": None})  # before the derivation: the same 65,536
    assert quality.stale_derivation(old_published) is None
    assert quality.stale_derivation(summary("auto", {"out_dim": 512}, {"train.lr": None,
                                                                     "method.params.out_dim": 512})) is None
    assert quality.stale_derivation(summary("published", {"out_dim": 1024}, {"train.lr": None})) is None  # explicit
    assert quality.stale_derivation(summary("published", {"out_dim": 65536},
                                            {"train.lr": None, "method.params.out_dim": 65536})) is None
    assert quality.stale_derivation({"recipe": {}}) is None  # a run from before presets
