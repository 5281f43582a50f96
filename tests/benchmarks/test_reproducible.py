"""Benchmarks from a fresh clone: one set-up command builds the protocol subsets from ../shared (and says clearly
when it is missing), a dry run does no work, RESULTS.md's per-cell commands are pinned to the settings they ran
with, and the measured table reaches `distillctl methods list` and the README through render.py's data file."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

TEACHER_CARD = {"arch": "resnet18", "input_size": [3, 64, 64], "mean": [0.4914, 0.4822, 0.4465],
                "std": [0.247, 0.2435, 0.2616], "knn_top1": {"value": 0.86}}


def _run(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)


def _fake_shared(root: Path, per_class: dict[str, int] | None = None) -> Path:
    """../shared with a tarball of tiny JPEGs (``per_class`` images per class per split; empty when None) and a
    teacher file + card (the card is all a dry run reads)."""
    from PIL import Image

    shared = root / "shared"
    (shared / "data").mkdir(parents=True)
    (shared / "teachers").mkdir()
    (shared / "teachers" / "resnet18_cifar10_64px.safetensors").write_bytes(b"not read by these tests")
    (shared / "teachers" / "resnet18_cifar10_64px.json").write_text(json.dumps(TEACHER_CARD))
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (120, 30, 200)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    with tarfile.open(shared / "data" / "cifar10-jpeg.tar.gz", "w:gz") as archive:
        for split, count in (per_class or {}).items():
            for cls in ("cat", "dog"):
                for i in range(count):
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = len(jpeg)
                    archive.addfile(info, io.BytesIO(jpeg))
    return shared


def _env(tmp_path: Path, shared: Path) -> dict:
    return {"DISTILLCTL_SHARED": str(shared), "DISTILLCTL_BENCH_WORK": str(tmp_path / "work"),
            "DISTILLCTL_BENCH_RESULTS": str(tmp_path / "results")}


def test_setup_data_help_and_missing_shared(tmp_path):
    assert "Example" in _run("setup_data.py", "--help", env={}).stdout
    proc = _run("setup_data.py", env=_env(tmp_path, tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert "benchmark inputs missing" in proc.stderr and "cifar10-jpeg.tar.gz" in proc.stderr
    assert "../shared" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "work").exists()


def test_setup_data_builds_the_protocol_subsets_once(tmp_path):
    shared = _fake_shared(tmp_path, {"train": 100, "test": 50})
    env = _env(tmp_path, shared)
    proc = _run("setup_data.py", "--subsets", "train1k,test500", "--random-students", "test_resnet", env=env)
    assert proc.returncode == 0, proc.stderr
    work = tmp_path / "work"
    for name, count in (("train1k", 100), ("test500", 50)):
        for cls in ("cat", "dog"):
            assert len(list((work / name / cls).glob("*.jpg"))) == count
        assert (work / name / ".complete").is_file()
    random = work / "quality" / "reference" / "random-test_resnet"  # the floor rows' eval commands read it
    assert (random / "model.safetensors").is_file() and json.loads((random / "config.json").read_text())["arch"] == "test_resnet"
    again = _run("setup_data.py", "--subsets", "train1k,test500", "--random-students", "none", env=env)
    assert again.returncode == 0 and again.stderr.count("already there") == 2
    check = _run("setup_data.py", "--check", env=env)
    assert check.returncode == 1 and "train10k: missing" in check.stdout and "train1k: ready" in check.stdout
    too_many = _run("setup_data.py", "--subsets", "train10k", env=env)  # 1,000 per class asked, 100 there
    assert too_many.returncode == 1 and "fewer than 1000" in too_many.stderr


def test_quality_dry_run_does_no_work(tmp_path):
    shared = _fake_shared(tmp_path)  # an empty tarball: a dry run must not even open it
    proc = _run("quality.py", "--dry-run", "--methods", "simreg,compress-1q", "--ssl-methods", "mocov2",
                env=_env(tmp_path, shared))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("distillctl run --method compress-1q") for line in lines)
    assert all("method.preset=auto" in line for line in lines) and len(lines) == 3
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()


def test_reproducible_commands_and_lr():
    import render

    legacy_run = "distillctl run --method compress-1q --teacher t --batch-size 64 --set train.max_steps=468"
    pinned = render.reproducible_command(legacy_run)
    assert pinned.endswith("--set method.preset=published --lr 0.05")
    legacy_pretrain = "distillctl pretrain --method simclr --arch mobilenetv2_100"
    assert render.reproducible_command(legacy_pretrain).endswith("--set method.preset=published --lr 0.06")
    new = "distillctl run --method seed --set method.preset=auto"
    assert render.reproducible_command(new) == new
    assert render.reproducible_command("distillctl eval knn x") == "distillctl eval knn x"
    assert render.cell_lr({"command": legacy_run}) == 0.05
    # a preset-era cell whose values the preset policy now derives differently is pinned to what it ran with
    current = render.reproducible_command(new, {"method": "seed", "preset": "auto", "steps": 1875, "lr": 0.03,
                                                "derived": {"method.params.queue_size": {"value": 8192},
                                                            "train.lr": {"value": 0.03}}}, 10_000)
    assert current == new  # seed's auto derivation is unchanged: nothing to pin
    assert render.cell_lr({"command": new, "lr": 0.03}) == 0.03
    assert render.cell_lr({"command": "distillctl run --lr 0.2 --method x"}) == 0.2


def test_stale_preset_cells_are_pinned_to_what_they_ran_with():
    """An smd [auto] cell from before SMD's short-run settings (warm-up share 0.06, lr 0.0125, params at the
    paper's) gets each changed key pinned, so its command gives its number again; an explicit --set is kept as
    given and not pinned twice; the suite's reuse check sees the same keys."""
    import quality
    import render

    command = ("distillctl run --method smd --batch-size 64 --set method.preset=auto --set train.max_steps=468 "
               "--set method.params.center=batch")
    row = {"method": "smd", "preset": "auto", "steps": 468, "lr": 0.0125,
           "derived": {"method.params.warmup_epochs": {"value": 0.06}, "train.lr": {"value": 0.0125}}}
    pinned = render.reproducible_command(command, row, 10_000)
    assert pinned == (command + " --set method.params.temperature=null --set method.params.times=1.0"
                      " --set method.params.warmup_epochs=0.06 --lr 0.0125")
    assert render.reproducible_command(command, row, 10_000).count("method.params.center") == 1
    # what the suite checks before reusing that cell: the same changes, then → now
    summary = {"recipe": {"method": {"name": "smd", "preset": "auto", "params": {"center": "batch",
                                                                                   "warmup_epochs": 0.06}},
                          "train": {"max_steps": 468, "batch_size": 64, "lr": 0.0125},
                          "derived": row["derived"]}, "data": {"images": 10_000}}
    assert [key for key, _, _ in quality.stale_values(summary)] == [
        "method.params.temperature", "method.params.times", "method.params.warmup_epochs", "train.lr"]


def _quality(rows: dict) -> dict:
    return {"command": "python benchmarks/quality.py", "rows": rows,
            "machine": {"git_commit": "abc1234", "date_utc": "2026-01-01 00:00 UTC", "cores": 2},
            "config": {"budget_images": 30000, "batch_size": 64, "image_size": 64, "cache_views": 4, "seed": 0,
                       "students": "mobilenetv2_100", "train_images": 10000, "test_images": 2000,
                       "data": {"train": "train10k", "test": "test2k"}, "teacher": {"file": "t.safetensors"}},
            "reference": {"teacher_knn": {"sup": 80.0}, "random": {"knn_top1": 20.0}}}


def _row(method: str, budget: int, knn: float, kind: str = "distill") -> dict:
    verb = "run" if kind == "distill" else "pretrain"
    return {"id": f"{method}-{budget}", "method": method, "budget": budget, "knn_top1": knn, "linear_top1": knn + 1,
            "kind": kind, "status": "done", "teacher": "sup" if kind == "distill" else None,
            "command": f"distillctl {verb} --method {method}"}


def test_render_writes_the_measured_table_and_the_readme_block(tmp_path):
    import render

    results = tmp_path / "results"
    results.mkdir()
    rows = {"a": _row("compress-1q", 30000, 40.0), "b": _row("smd", 30000, 15.0), "c": _row("simreg", 30000, 35.0),
            "d": _row("compress-1q", 120000, 60.0), "e": _row("simreg", 120000, 50.0),
            "f": _row("simclr", 30000, 28.0, "ssl")}
    (results / "quality.json").write_text(json.dumps(_quality(rows)))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{render.README_START}\nold\n{render.README_END}\n\n## Next\n")
    measured = tmp_path / "measured.json"
    text = render.render(results, tmp_path / "RESULTS.md", plots_enabled=False, measured=measured, readme=readme)
    assert "| compress-1q | distill | ResNet-18 sup. | 30,000 | 0.05 | 40.0 |" in text
    assert "compress-1q: ran at lr 0.05; published 0.01 at batch 256 (sgd, not scaled by batch)" in text
    assert "python benchmarks/setup_data.py" in text
    assert "distillctl run --method compress-1q --set method.preset=published --lr 0.05" in text
    data = json.loads(measured.read_text())
    assert data["source"]["file"] == "benchmarks/RESULTS.md" and data["source"]["commit"] == "abc1234"
    cells = {c["images_seen"]: c for c in data["methods"]["compress-1q"]["cells"]}
    assert cells[30000]["rank"] == 1 and cells[30000]["of"] == 3 and cells[30000]["student_teacher"] == 0.5
    assert cells[120000]["knn_top1"] == 60.0 and data["methods"]["simclr"]["kind"] == "ssl"
    block = readme.read_text()
    assert "old" not in block and block.endswith("## Next\n") and "## Which method?" in block
    assert "| 30,000 | compress-1q 40.0 (0.50), simreg 35.0 (0.44), smd 15.0 (0.19) | simclr 28.0 | 20.0 |" in block
    assert "compress-1q is first at every budget measured" in block
    assert "Below the random-init student on this protocol (at the budgets named): smd (30,000)" in block


def test_methods_list_and_show_read_the_packaged_table(tmp_path):
    from distillctl.methods import measured

    data = {"source": {"file": "benchmarks/RESULTS.md", "commit": "abc", "date": "d", "protocol": "p"},
            "reference": {"random_init_knn_top1": 20.0, "teacher_knn_top1": 80.0},
            "methods": {"simreg": {"kind": "distill", "cells": [
                {"images_seen": 30000, "knn_top1": 35.0, "rank": 2, "of": 3, "lr": 0.05, "preset": "published"},
                {"images_seen": 120000, "knn_top1": 50.0, "rank": 1, "of": 2, "lr": 0.05, "preset": "published"}]}}}
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(data))
    loaded = measured.load(path)
    assert measured.summary(loaded, "simreg") == "30k #2/3 35.0 · 120k #1/2 50.0"
    assert measured.summary(loaded, "seed") == "–"
    assert measured.ran_lr(loaded, "simreg") == "0.05 (published)"
    assert "benchmarks/RESULTS.md" in measured.source_line(loaded) and "random-init student 20.0" in measured.source_line(loaded)
    assert measured.load(tmp_path / "missing.json")["methods"] == {}


def test_rows_of_two_ssl_teachers_divide_by_their_own_teacher():
    """Result files of two SSL teachers (both rows' teacher is ``ssl``): each row's student/teacher uses the kNN of
    the teacher in its own file, each teacher gets its row and its label names it."""
    import render

    def ssl_file(method: str, budget: int, knn: float, student_knn: float) -> dict:
        q = _quality({f"ssl/seed-{budget}": {**_row("seed", 120000, student_knn), "teacher": "ssl",
                                             "id": f"ssl/seed-{budget}"}})
        q["reference"]["ssl_teacher"] = {"id": f"resnet18/none/{method}-{budget}", "method": method, "budget": budget,
                                         "student": "resnet18", "knn_top1": knn, "command": f"distillctl pretrain --method {method}"}
        return q

    q = render.merge_quality(render.merge_quality(_quality({"a": _row("compress-1q", 120000, 40.0)}),
                                                  ssl_file("mocov2", 6400, 20.0, 10.0)),
                             ssl_file("simclr", 1_000_000, 50.0, 40.0))
    assert [t["method"] for t in q["reference"]["ssl_teachers"]] == ["mocov2", "simclr"]
    assert q["rows"]["ssl/seed-6400"]["ssl_teacher_ref"]["knn_top1"] == 20.0
    assert q["rows"]["ssl/seed-1000000"]["ssl_teacher_ref"]["knn_top1"] == 50.0
    text, _ = render.quality_section(q, [])
    simclr_row = next(line for line in text.splitlines() if "ResNet-18 SSL (simclr, 1,000,000 images)" in line)
    mocov2_row = next(line for line in text.splitlines() if "ResNet-18 SSL (mocov2, 6,400 images)" in line)
    assert "| 0.80 |" in simclr_row and "| 0.50 |" in mocov2_row  # 40 / 50 and 10 / 20
    assert "`distillctl pretrain --method simclr" in text and "`distillctl pretrain --method mocov2" in text


def test_a_cell_measured_again_by_a_later_run_replaces_the_earlier_row(tmp_path):
    """Re-measuring a cell into its own result file (e.g. after a preset change) replaces the old row in the table,
    whichever file name sorts first; rows only one file has are all kept."""
    import render

    results = tmp_path / "results"
    results.mkdir()
    old = {**_quality({"x/ssl-small-120000": _row("ssl-small", 120000, 28.0, "ssl"),
                       "x/mocov2-120000": _row("mocov2", 120000, 35.0, "ssl")}), "finished_utc": "2026-12-01T04:40:49Z"}
    new = {**_quality({"x/ssl-small-120000": _row("ssl-small", 120000, 31.0, "ssl")}),
           "finished_utc": "2026-12-02T01:00:00Z", "command": "python benchmarks/quality.py --ssl-methods ssl-small"}
    (results / "quality_b_old.json").write_text(json.dumps(old))
    (results / "quality_a_new.json").write_text(json.dumps(new))  # sorts first, finished later
    q = render.table_quality(results)
    assert q["rows"]["x/ssl-small-120000"]["knn_top1"] == 31.0 and q["rows"]["x/mocov2-120000"]["knn_top1"] == 35.0
    (results / "quality_a_new.json").rename(results / "quality_c_new.json")  # sorts last, finished later
    q = render.table_quality(results)
    assert q["rows"]["x/ssl-small-120000"]["knn_top1"] == 31.0
    older = {**new, "finished_utc": "2026-11-01T00:00:00Z"}  # a file finished earlier never wins a shared cell
    (results / "quality_c_new.json").write_text(json.dumps(older))
    assert render.table_quality(results)["rows"]["x/ssl-small-120000"]["knn_top1"] == 28.0


def test_a_later_run_at_another_lr_keeps_the_earlier_measurement_beside_it(tmp_path):
    """A cell re-run after the preset changed its lr (compress-1q at 1,000,000 images: lr 0.01, then the short-run
    0.05) is a new experiment: the table shows both, the earlier one under ``<key>@lr=<lr>``, and the method is
    ranked by its better cell. A re-run at the same lr still replaces the row."""
    import render

    results = tmp_path / "results"
    results.mkdir()
    key = "mobilenetv2_100/sup/compress-1q-1000000-auto"
    old = {**_quality({key: {**_row("compress-1q", 1_000_000, 54.4), "lr": 0.01, "preset": "auto"}}),
           "finished_utc": "2026-11-28T00:00:00Z"}
    new = {**_quality({key: {**_row("compress-1q", 1_000_000, 73.0), "lr": 0.05, "preset": "auto"}}),
           "finished_utc": "2026-12-02T13:00:00Z"}
    (results / "quality_1m.json").write_text(json.dumps(old))
    (results / "quality_compress_1m.json").write_text(json.dumps(new))
    q = render.table_quality(results)
    assert q["rows"][key]["knn_top1"] == 73.0 and q["rows"][f"{key}@lr=0.01"]["knn_top1"] == 54.4
    text, _ = render.quality_section(q, [])
    assert "| 1,000,000 | 0.01 | 54.4 |" in text and "| 1,000,000 | 0.05 | 73.0 |" in text
    cells = render.measured_data(q, render.quality_facts(q))["methods"]["compress-1q"]["cells"]
    assert [(c["images_seen"], c["knn_top1"]) for c in cells] == [(1_000_000, 73.0)]  # ranked once, by the better
    same = {**new, "finished_utc": "2026-12-03T00:00:00Z",
            "rows": {key: {**new["rows"][key], "knn_top1": 73.5}}}
    (results / "quality_compress_1m_again.json").write_text(json.dumps(same))
    q = render.table_quality(results)
    assert q["rows"][key]["knn_top1"] == 73.5 and not any("@lr=0.05" in k for k in q["rows"])


def test_a_later_run_with_another_teacher_mode_keeps_the_online_measurement_beside_it(tmp_path):
    """pcd at 120,000 images ran its teacher online, then from a feature cache holding the teacher's maps: both rows
    stay (the online one under ``<key>@mode=online``, its command pinned online), each with its mode."""
    import render

    results = tmp_path / "results"
    results.mkdir()
    key = "mobilenetv2_100/sup/pcd-120000-auto"
    cell = {**_row("pcd", 120_000, 59.1), "lr": 0.05, "preset": "auto", "teacher_mode": "online",
            "command": "distillctl run --method pcd --set method.preset=auto"}
    old = {**_quality({key: cell}), "finished_utc": "2026-11-28T00:00:00Z"}
    new = {**_quality({key: {**cell, "knn_top1": 58.0, "teacher_mode": "cached"}}),
           "finished_utc": "2026-12-02T18:00:00Z"}
    (results / "quality_pcd_120k.json").write_text(json.dumps(old))
    (results / "quality_pcd_cached_120k.json").write_text(json.dumps(new))
    q = render.table_quality(results)
    assert q["rows"][key]["teacher_mode"] == "cached" and q["rows"][f"{key}@mode=online"]["knn_top1"] == 59.1
    text, _ = render.quality_section(q, [])
    assert "| 59.1 |" in text and "| 58.0 |" in text
    assert "distillctl run --method pcd --set method.preset=auto --teacher-mode online" in text
    cells = render.measured_data(q, render.quality_facts(q))["methods"]["pcd"]["cells"]
    assert [(c["images_seen"], c["knn_top1"]) for c in cells] == [(120_000, 59.1)]  # ranked once, by the better


def test_a_method_measured_twice_at_one_budget_is_ranked_and_counted_once():
    """Two cells of one method at one budget (the published preset's and auto's): the better one ranks it, the
    method is counted once, and the other methods' ranks are not shifted."""
    import render

    q = _quality({"a": _row("compress-1q", 120000, 55.8), "b": {**_row("compress-1q", 120000, 56.15), "id": "b"},
                  "c": _row("seed", 120000, 51.5), "d": _row("dlkd", 120000, 68.0)})
    q["config"]["budget_images"] = 120000
    facts = render.quality_facts(q)
    assert [r["method"] for r in facts["distill"]] == ["dlkd", "compress-1q", "seed"]
    assert facts["distill"][1]["knn_top1"] == 56.15
    cells = render.measured_data(q, facts)["methods"]
    assert [(c["knn_top1"], c["rank"], c["of"]) for c in cells["compress-1q"]["cells"]] == [(56.15, 2, 3)]
    assert cells["seed"]["cells"][0]["rank"] == 3


def test_packaged_table_matches_results_md():
    """The shipped data file is render.py's output for the shipped results (regenerate with render.py)."""
    import render

    shipped = json.loads((REPO / "distillctl" / "methods" / "measured.json").read_text())
    q = render.table_quality(BENCH / "results")
    dense = render.dense_quality(BENCH / "results")
    assert shipped == json.loads(json.dumps(render.measured_data(q, render.quality_facts(q), dense)))


@pytest.mark.parametrize("command", [["methods", "list", "--json"], ["methods", "show", "compress-1q", "--json"]])
def test_cli_reports_measured_numbers_with_their_source(command):
    proc = subprocess.run([sys.executable, "-m", "distillctl", *command], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["measured_source"]["file"] == "benchmarks/RESULTS.md"
    if command[1] == "list":
        rows = {row["name"]: row for row in data["methods"]}
        assert rows["compress-1q"]["measured"] and rows["compress-1q"]["measured"][0]["lr"] == 0.05
    else:
        assert data["preset"]["lr"] == 0.01 and data["preset"]["batch"] == 256
        # cells from before method.preset ran at the CLI's lr; the auto cells at 120,000 and 1,000,000 at the
        # short-run lr that auto now starts from (the 1,000,000 cell at the paper's lr 0.01, measured before the
        # short-run lr, stays in RESULTS.md but is the weaker cell of that budget: not the one listed)
        assert {c["lr"] for c in data["measured"] if c["preset"] != "auto"} == {0.05}
        auto = {c["images_seen"]: c["lr"] for c in data["measured"] if c["preset"] == "auto"}
        assert auto[1_000_000] == auto[120_000] == data["preset"]["short_run"]["lr"] == 0.05 != data["preset"]["lr"]


def test_cells_of_another_preset_are_never_reused(tmp_path, monkeypatch):
    """A --preset auto suite must not pick up (or overwrite) the cells that ran before method.preset."""
    import quality

    monkeypatch.setattr(quality, "WORK", tmp_path)
    args = quality.parse_args(["--methods", "simreg", "--ssl-methods", "none", "--budget-images", "30000"])
    methods = [{"name": "simreg", "kind": "distill", "teacher_mode": "cached_exact"}]
    (cell,) = quality.plan_cells(args, methods)
    assert cell["preset"] == "auto" and quality.cell_id(cell) == "mobilenetv2_100/sup/simreg-30000-auto"
    legacy = {k: v for k, v in cell.items() if k != "preset"}
    assert quality.cell_id(legacy) == "mobilenetv2_100/sup/simreg-30000"  # the ids in today's results
    summary = {"recipe": {"train": {"max_steps": 468}, "method": {"name": "simreg", "preset": "published"}},
               "train": {"steps": 468}, "student": {"knn_top1": 30.0}}
    quality.cell_dir(cell).mkdir(parents=True)
    (quality.cell_dir(cell) / "summary.json").write_text(json.dumps(summary))
    assert quality.finished(cell, 468) is None  # ran with another preset: not this cell's result
    summary["recipe"]["method"]["preset"] = "auto"
    (quality.cell_dir(cell) / "summary.json").write_text(json.dumps(summary))
    assert quality.finished(cell, 468) == summary


def test_methods_share_a_feature_cache_only_when_the_pipeline_would_store_the_same_views():
    """rekd (moco-v2 views, no teacher-only view) and noroozi-kt (weak views) once got one cache directory, and the
    second cell stopped with exit 3 ('does not match this run'): the key follows the pipeline's stored spec."""
    import argparse

    import quality

    from distillctl.methods.base import TeacherDims

    args = argparse.Namespace(cache_views=4, seed=0, image_size=64)

    def cache(method: str) -> str:
        return quality.cache_dir_for(method, "sup", TeacherDims(512, None), "mobilenetv2_100", args).name

    assert cache("rekd") != cache("noroozi-kt")
    assert cache("rekd") == cache("protocpc")  # both store moco-v2 views of the same teacher output
    # pcd stores the teacher's stage map beside the pooled vector: a cache of its own, never a plain one
    assert cache("pcd") == cache("dense-reg") != cache("simreg")
    # dlkd stores each crop at four rotations: a cache of its own, keyed by its rotations
    assert cache("dlkd") not in {cache("simreg"), cache("seed"), cache("pcd")}


def test_cells_that_ran_online_are_pinned_online():
    """pcd and dense-reg ran their teacher online before the cache stored teacher maps, dlkd before it stored
    rotated copies; `auto` now caches them, so every online cell's command says --teacher-mode online."""
    import render

    command = "distillctl run --method pcd --teacher t --set method.preset=auto"
    row = {"method": "pcd", "teacher_mode": "online"}
    assert render.reproducible_command(command, row) == command + " --teacher-mode online"
    assert render.reproducible_command(command, {**row, "teacher_mode": "cached"}) == command
    assert render.reproducible_command(command + " --teacher-mode online", row) == command + " --teacher-mode online"
    # any method's online cell: dlkd ran online before the cache stored rotated copies, and auto caches it now
    other = "distillctl run --method dlkd --teacher t --set method.preset=auto"
    assert render.reproducible_command(other, {"method": "dlkd", "teacher_mode": "online"}) == \
        other + " --teacher-mode online"
    assert render.reproducible_command(other, {"method": "dlkd", "teacher_mode": "cached"}) == other


def test_a_sweep_variant_that_changes_the_stored_view_gets_that_views_cache():
    """A one-factor cell that changes the stored view (smd augmentation=weak) once got the default view's cache and
    stopped with exit 3; now its cache key follows its own params. A setting that leaves the view alone (times)
    keeps sharing the published cell's cache."""
    import argparse

    import quality

    args = argparse.Namespace(cache_views=4, seed=0, image_size=64, batch_size=64, preset="published", no_linear=True,
                              online="", ssl_teacher_mode="auto")
    data = {"train": "train10k", "test": "test2k", "train_images": 10_000}
    pre = {"mean": [0.5] * 3, "std": [0.25] * 3}
    teachers = {"sup": {"path": "t.safetensors", "arch": "resnet18", "dim": 512, "key": "sup",
                        "modes": {"smd": "cached_exact"}}}

    def cache_of(*sets: str) -> str:
        cell = {"kind": "distill", "method": "smd", "teacher": "sup", "student": "mobilenetv2_100",
                "budget": 30_000, "preset": "published", "sets": list(sets), "dir": "x"}
        command = quality.cell_command(cell, args, data, pre, teachers, False)
        return command[command.index("--cache") + 1]

    assert quality.method_params_set({"sets": ["method.params.crop_scale=[0.4, 1.0]", "train.lr=0.1"]}) == {
        "crop_scale": [0.4, 1.0]}
    published = cache_of()
    assert cache_of("method.params.times=0.1") == published
    assert cache_of("train.lr=0.5") == published
    weak = cache_of("method.params.augmentation=weak")
    assert weak != published and weak.startswith(str(quality.WORK / "caches" / "sup-"))


def test_two_invocations_writing_one_result_file_keep_each_others_rows(tmp_path, monkeypatch):
    """Two sweeps (or quality runs) of different methods into one result file: each write merges with what is on
    disk, so neither the other's new rows nor its updates of shared rows are lost to a stale in-memory snapshot."""
    import quality

    monkeypatch.setattr(quality, "WORK", tmp_path / "work")
    out = tmp_path / "results" / "sweep.json"
    out.parent.mkdir()
    out.write_text(json.dumps({"rows": {"old": {"knn_top1": 1.0}, "retry": {"status": "failed"}},
                               "plans": {"p-old": {"method": "old"}}, "commands": ["c0"]}))

    def invocation(command: str) -> dict:
        previous = json.loads(out.read_text())
        return {"rows": dict(previous["rows"]), "plans": dict(previous["plans"]),
                "commands": previous["commands"] + [command]}

    a, b = invocation("c-a"), invocation("c-b")  # both started from the same file
    save_a = quality.start_saving(a, out, 0.0, 0.0)
    save_b = quality.start_saving(b, out, 0.0, 0.0)
    a["rows"]["mse"] = {"knn_top1": 34.2}
    a["plans"]["p-mse"] = {"method": "mse"}
    save_a()
    b["rows"]["rekd"] = {"knn_top1": 15.0}
    b["rows"]["retry"] = {"status": "done", "knn_top1": 20.0}
    save_b()
    save_a()  # a's heartbeat: its stale copy of "retry" and its missing "rekd" must not win
    disk = json.loads(out.read_text())
    assert disk["rows"] == {"old": {"knn_top1": 1.0}, "retry": {"status": "done", "knn_top1": 20.0},
                            "mse": {"knn_top1": 34.2}, "rekd": {"knn_top1": 15.0}}
    assert set(disk["plans"]) == {"p-old", "p-mse"}
    assert disk["commands"] == ["c0", "c-a", "c-b"]  # start_saving writes at once: a first
    assert not (out.parent / "sweep.json.lock").exists()  # the lock file is hidden (.sweep.json.lock, git-ignored)
    # a plan (or row) the invocation made before its first save, as sweep.py's start_result does, is written too
    c = invocation("c-c")
    c["plans"]["p-new"] = {"method": "new"}
    c["rows"]["old"] = {"knn_top1": 2.0}
    quality.start_saving(c, out, 0.0, 0.0)
    disk = json.loads(out.read_text())
    assert set(disk["plans"]) == {"p-old", "p-mse", "p-new"} and disk["rows"]["old"] == {"knn_top1": 2.0}


def test_table_merges_table_suite_files_whatever_their_name(tmp_path):
    """A table-suite file whose name starts like the dense suite's (quality_densereg_120k.json: the dense-reg
    method at 120,000) joins the table; the dense suite's own file and the --quick smoke run do not."""
    import render

    def suite(name: str, kind: str | None, method: str) -> None:
        row = {"method": method, "budget": 120000, "knn_top1": 40.0, "kind": "distill", "status": "done",
               "teacher": "sup"}
        data = {"config": {"budget_images": 120000}, "reference": {}, "rows": {f"{method}-120000": row}}
        if kind:
            data["suite"] = kind
        (tmp_path / name).write_text(json.dumps(data))

    suite("quality.json", None, "seed")
    suite("quality_densereg_120k.json", "table", "dense-reg")
    suite("quality_dense.json", "dense", "pcd")
    suite("quality_quick.json", "table", "simreg")
    merged = render.table_quality(tmp_path)
    assert sorted(r["method"] for r in merged["rows"].values()) == ["dense-reg", "seed"]


def test_a_cell_row_records_the_thread_count_and_its_command_says_it(tmp_path, monkeypatch):
    """Float reductions, and so the trained weights, follow the intra-op thread count: the row keeps the count the
    run recorded, and RESULTS.md's command for it sets OMP_NUM_THREADS (rows without one are left as they ran)."""
    import quality
    import render

    monkeypatch.setattr(quality, "WORK", tmp_path)
    args = quality.parse_args(["--methods", "simreg", "--ssl-methods", "none", "--budget-images", "30000"])
    (cell,) = quality.plan_cells(args, [{"name": "simreg", "kind": "distill", "teacher_mode": "cached_exact"}])
    summary = {"recipe": {"train": {"max_steps": 468, "batch_size": 64}, "method": {"name": "simreg", "preset": "auto"}},
               "train": {"steps": 468, "threads": {"threads": 2, "source": "OMP_NUM_THREADS"}},
               "student": {"knn_top1": 30.0}}
    row = quality.row_from_summary(cell, summary, ["run", "--method", "simreg", "--set", "method.preset=auto"])
    assert row["threads"] == 2
    assert render.reproducible_command(row["command"], row).startswith("OMP_NUM_THREADS=2 distillctl run --method simreg")
    assert not render.reproducible_command(row["command"], {**row, "threads": None}).startswith("OMP_NUM_THREADS")
