"""The issue-14 dense suite of benchmarks/quality.py (``--suite dense``, ``--dense``): cell planning, the dry run and
its estimate, render.py's dense section and columns, and (slow) the whole suite in --quick mode on tiny generated
data with a real teacher, resumed without rerunning anything."""

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

METHODS = [{"name": n, "kind": "distill", "teacher_mode": "online"} for n in ("pcd", "dense-reg", "attndistill", "mae-lite")]
METHODS += [{"name": "compress-1q", "kind": "distill", "teacher_mode": "cached_exact"},
            {"name": "mae", "kind": "ssl", "teacher_mode": "none"}]


def _run(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "quality.py"), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=timeout)


def _shared(root: Path, teacher_arch: str, real_teacher: bool) -> Path:
    """A ../shared with a tarball of 8 px JPEGs (2 classes, 100 train / 50 test each: the --quick subsets) whose
    colour tells the class, and a teacher card (+ a random-init timm teacher file when ``real_teacher``)."""
    import numpy as np
    from PIL import Image

    shared = root / "shared"
    (shared / "data").mkdir(parents=True)
    (shared / "teachers").mkdir()
    card = {"arch": teacher_arch, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "knn_top1": {"value": 0.5}}
    (shared / "teachers" / "resnet18_cifar10_64px.json").write_text(json.dumps(card))
    teacher = shared / "teachers" / "resnet18_cifar10_64px.safetensors"
    if real_teacher:
        import timm
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = timm.create_model(teacher_arch, num_classes=0)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(teacher))
    else:
        teacher.write_bytes(b"not read by a dry run")
    rng = np.random.default_rng(0)
    with tarfile.open(shared / "data" / "cifar10-jpeg.tar.gz", "w:gz") as archive:
        for split, count in (("train", 100), ("test", 50)):
            for c, cls in enumerate(("cat", "dog")):
                for i in range(count):
                    pixels = rng.integers(0, 80, (8, 8, 3), dtype=np.uint8) + np.uint8(150 * c)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    archive.addfile(info, buffer)
    return shared


def _env(tmp_path: Path, shared: Path) -> dict:
    return {"DISTILLCTL_SHARED": str(shared), "DISTILLCTL_BENCH_WORK": str(tmp_path / "work"),
            "DISTILLCTL_BENCH_RESULTS": str(tmp_path / "results")}


def test_arch_specs_name_cells_and_commands():
    from common import arch_tag, split_specs, student_sets

    import quality

    assert split_specs("mobilenetv2_100, vit_tiny_patch16_224(patch_size=8, depth=2),") == \
        ["mobilenetv2_100", "vit_tiny_patch16_224(patch_size=8, depth=2)"]
    assert arch_tag("mobilenetv2_100") == "mobilenetv2_100"
    assert arch_tag("vit_tiny_patch16_224(patch_size=8, depth=2)") == "vit_tiny_patch16_224-depth2-patch_size8"
    assert student_sets("vit_tiny_patch16_224(patch_size=8)") == ["--set", "student.kwargs.patch_size=8"]
    assert student_sets("mobilenetv2_100") == []
    assert quality.split_teacher_spec("mae:vit_small_patch16_224(patch_size=8):50000") == \
        ("mae", "vit_small_patch16_224(patch_size=8)", 50000)
    with pytest.raises(quality.BenchError, match="METHOD:ARCH:IMAGES"):
        quality.split_teacher_spec("mae:vit_small_patch16_224")
    args = quality.parse_args(["--suite", "dense"])
    entry = quality.teacher_entry(args, args.vit_teacher)
    # the teacher is rebuilt as the pretrain run recorded it: its patch size and the run's 64 px grid
    assert entry["arch"] == "vit_small_patch16_224(img_size=64, patch_size=8)" and entry["dim"] == 384
    assert entry["path"].endswith("ssl-teacher/mae-vit_small_patch16_224-patch_size8-50000-auto/student/model.safetensors")


def test_dense_suite_defaults_and_cells():
    import quality

    args = quality.parse_args(["--suite", "dense"])
    assert (args.budget_images, args.batch_size, args.image_size, args.dense) == (30_000, 64, 64, True)
    assert (args.dense_mosaics, args.dense_val_mosaics, args.dense_epochs) == (1000, 500, 20)
    table = quality.parse_args([])
    assert (table.budget_images, table.dense) == (120_000, False)  # the table's defaults are unchanged
    quick = quality.parse_args(["--suite", "dense", "--quick", "--image-size", "16"])
    assert (quick.budget_images, quick.image_size, quick.dense_mosaics) == (256, 16, 64)  # explicit flags win

    cells = quality.plan_dense_cells(args, METHODS)
    assert [(c["method"], c["teacher"], c["student"]) for c in cells] == [
        ("pcd", "sup", "mobilenetv2_100"), ("dense-reg", "sup", "mobilenetv2_100"),
        ("compress-1q", "sup", "mobilenetv2_100"), ("compress-1q", "sup", "vit_tiny_patch16_224(patch_size=8)"),
        ("attndistill", "vit", "vit_tiny_patch16_224(patch_size=8)"),
        ("mae-lite", "vit", "vit_tiny_patch16_224(patch_size=8)")]
    assert all(c["budget"] == 30_000 and c["preset"] == "auto" for c in cells)
    assert cells[2]["role"] == "reference"
    vit = {c["method"]: c for c in cells if c["teacher"] == "vit"}
    # ViT-S has 6 heads, ViT-Ti 3: AttnDistill aggregates heads as its paper does for different counts
    assert "method.params.head_aggregation=true" in vit["attndistill"]["sets"]
    assert "method.params.head_aggregation=true" not in vit["mae-lite"]["sets"]
    assert all("train.optimizer=adamw" in c["sets"] and c["lr"] == 1e-3 for c in cells if "vit" in c["student"])
    assert quality.cell_id(vit["mae-lite"]) == ("vit_tiny_patch16_224-patch_size8/vit-mae-vit_small_patch16_224-"
                                                "patch_size8-50000-auto/mae-lite-30000-auto")
    with pytest.raises(quality.BenchError, match="unknown method"):
        quality.plan_dense_cells(quality.parse_args(["--suite", "dense", "--dense-methods", "nope"]), METHODS)
    # 'none' leaves a group out: only the ViT-teacher cells, e.g. at another budget
    only_vit = quality.plan_dense_cells(quality.parse_args(
        ["--suite", "dense", "--dense-methods", "none", "--reference-method", "none", "--vit-global-method", "none",
         "--vit-teacher-methods", "mae-lite", "--budget-images", "120000"]), METHODS)
    assert [(c["method"], c["teacher"], c["budget"]) for c in only_vit] == [("mae-lite", "vit", 120_000)]


def test_dense_dry_run_prints_commands_and_estimate(tmp_path):
    shared = _shared(tmp_path, "resnet18", real_teacher=False)
    proc = _run("--suite", "dense", "--dry-run", "--threads", "1", env=_env(tmp_path, shared))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    commands = [line for line in lines if not line.startswith("# estimate")]
    assert len(commands) == 7  # 4 supervised-teacher cells, the ViT teacher, 2 ViT-teacher cells
    assert all(line.startswith("# ~") and " min  distillctl " in line for line in commands)
    pretrain = next(line for line in commands if "distillctl pretrain" in line)
    assert "--method mae --arch vit_small_patch16_224" in pretrain and "--set student.kwargs.patch_size=8" in pretrain
    assert "--set train.optimizer=adamw" in pretrain and "--lr 0.001" in pretrain
    attn = next(line for line in commands if "--method attndistill" in line)
    assert "--teacher-arch 'vit_small_patch16_224(img_size=64, patch_size=8)'" in attn
    assert "--student vit_tiny_patch16_224" in attn and "head_aggregation=true" in attn
    assert lines[-1].startswith("# estimate: ~") and " h at 1 thread(s)" in lines[-1]
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()  # a dry run makes nothing


def _dense(miou: float, grid: int = 4) -> dict:
    return {"miou": miou, "pixel_accuracy": miou + 10, "feature_grid": [grid, grid], "lr": 0.1, "weight_decay": 0.0,
            "command": f"distillctl eval dense x-{miou}"}


def _fake_dense_results(directory: Path) -> None:
    row = {"kind": "distill", "status": "done", "budget": 30000, "preset": "auto", "knn_top1": 30.0,
           "linear_top1": 31.0, "train_wall_s": 100.0, "images_per_sec": 50.0}
    rows = {"pcd": {**row, "method": "pcd", "teacher": "sup", "student": "mobilenetv2_100", "dense": _dense(41.5),
                    "command": "distillctl run --method pcd"},
            "attn": {**row, "method": "attndistill", "teacher": "vit", "student": "vit_tiny_patch16_224(patch_size=8)",
                     "dense": {"error": "distillctl eval exited 1: boom", "command": "distillctl eval dense y"},
                     "command": "distillctl run --method attndistill"},
            "ref": {**row, "method": "compress-1q", "teacher": "sup", "student": "mobilenetv2_100", "role": "reference",
                    "preset": None, "dense": _dense(35.25), "command": "distillctl run --method compress-1q"}}
    dense = {"benchmark": "quality-dense", "suite": "dense", "command": "python benchmarks/quality.py --suite dense",
             "config": {"budget_images": 30000, "batch_size": 64, "image_size": 64, "seed": 0, "train_images": 10000,
                        "test_images": 2000, "data": {"train": "train10k", "test": "test2k"},
                        "teacher": {"file": "t.safetensors"}, "cnn_student": "mobilenetv2_100",
                        "vit_student": "vit_tiny_patch16_224(patch_size=8)", "vit_lr": 0.001,
                        "vit_teacher": "mae:vit_small_patch16_224(patch_size=8):50000",
                        "dense_probe": {"task": "mosaic-2x2", "mosaics": 1000, "val_mosaics": 500, "epochs": 20}},
             "rows": rows, "elapsed_s": 60,
             "reference": {"teacher": {"knn_top1": 86.0, "linear_top1": 86.5, "dense": _dense(70.0, 2),
                                       "knn_command": "distillctl eval knn teacher:t"},
                           "random:mobilenetv2_100": {"knn_top1": 22.0, "dense": _dense(20.0)},
                           "vit_teacher": {**row, "method": "mae", "student": "vit_small_patch16_224(patch_size=8)",
                                           "budget": 50000, "knn_top1": 25.0, "dense": _dense(28.0, 16),
                                           "command": "distillctl pretrain --method mae"}}}
    (directory / "quality_dense.json").write_text(json.dumps(dense))


def test_render_dense_section(tmp_path):
    import render

    results = tmp_path / "results"
    results.mkdir()
    _fake_dense_results(results)
    text = render.render(results, tmp_path / "RESULTS.md", plots_enabled=False, measured=None, readme=None)
    section = text[text.index("## Dense features"):]
    assert "| pcd [auto] | `mobilenetv2_100` | ResNet-18 sup. | 30,000 | 30.0 | 31.0 | 41.5 | 51.5 | 4×4 | 100 | 50 |" in section
    assert "| compress-1q (best global method) | `mobilenetv2_100` |" in section and "| 35.2 | 45.2 |" in section
    assert "| attndistill [auto] | `vit_tiny_patch16_224(patch_size=8)` | ViT teacher (mae) |" in section
    assert "| failed | failed |" in section and "dense probe of attndistill [auto] failed: distillctl eval exited 1" in section
    assert "| teacher ResNet-18 (supervised, t.safetensors) | – | – | – | 86.0 | 86.5 | 70.0 | 80.0 | 2×2 |" in section
    assert "| random-init `mobilenetv2_100` | floor | – | 0 | 22.0 | – | 20.0 | 30.0 | 4×4 |" in section
    assert "| ViT teacher: `distillctl pretrain --method mae` | `vit_small_patch16_224(patch_size=8)` |" in section
    assert "task `mosaic-2x2`" in section and "1,000 train mosaics from `train10k`" in section
    for command in ("python benchmarks/quality.py --suite dense", "distillctl pretrain --method mae",
                    "distillctl eval dense x-41.5", "distillctl eval knn teacher:t"):
        assert command in section[section.index("Exact commands"):]
    assert "- Dense probe mIoU % (mosaic-2x2, 30,000 images per cell): pcd [auto] on mobilenetv2_100 41.5 " \
           "(random-init 20.0)" in text
    assert "No results yet: run `python benchmarks/quality.py`." in text  # the dense rows never enter the main table


def test_render_merges_dense_runs_at_another_budget(tmp_path):
    """A dense-suite run written to its own file (the ViT-teacher cells at 120,000 images) joins the dense section:
    its cells beside the suite's, its command listed, running times added; the quick smoke file stays out."""
    import render

    results = tmp_path / "results"
    results.mkdir()
    _fake_dense_results(results)
    base = json.loads((results / "quality_dense.json").read_text())
    row = {"kind": "distill", "status": "done", "budget": 120000, "preset": "auto", "knn_top1": 27.5, "linear_top1": 36.0,
           "train_wall_s": 400.0, "images_per_sec": 60.0, "method": "mae-lite", "teacher": "vit",
           "student": "vit_tiny_patch16_224(patch_size=8)", "dense": _dense(12.5, 16),
           "command": "distillctl run --method mae-lite --epochs 12"}
    extra = {**base, "command": "python benchmarks/quality.py --suite dense --budget-images 120000",
             "config": {**base["config"], "budget_images": 120000}, "elapsed_s": 540, "finished_utc": "2026-12-02T07:00:00Z",
             "rows": {"mae-lite-120k": row}, "reference": {"random:vit_tiny_patch16_224(patch_size=8)": {"knn_top1": 28.0}}}
    (results / "quality_vit_120k.json").write_text(json.dumps(extra))
    quick = {**extra, "rows": {"q": {**row, "method": "simreg", "budget": 7}}}
    (results / "quality_dense_quick.json").write_text(json.dumps(quick))
    merged = render.dense_quality(results)
    assert set(merged["rows"]) == {"pcd", "attn", "ref", "mae-lite-120k"}
    assert merged["elapsed_s"] == 600 and merged["config"]["budget_images"] == 30000
    assert merged["reference"]["random:vit_tiny_patch16_224(patch_size=8)"] == {"knn_top1": 28.0}  # filled in
    assert merged["reference"]["teacher"]["knn_top1"] == 86.0  # the suite's own reference is kept
    text = render.render(results, tmp_path / "RESULTS.md", plots_enabled=False, measured=None, readme=None)
    section = text[text.index("## Dense features"):]
    section = section[:section.index("\n## ", 3)]
    assert "30,000 images seen per distillation cell (also 120,000: see the column \"images seen\")" in section
    assert ("| mae-lite [auto] | `vit_tiny_patch16_224(patch_size=8)` | ViT teacher (mae) | 120,000 | 27.5 | 36.0 | "
            "12.5 | 22.5 | 16×16 | 400 | 60 |") in section
    commands = section[section.index("Exact commands"):]
    assert "python benchmarks/quality.py --suite dense --budget-images 120000" in commands
    assert "distillctl run --method mae-lite --epochs 12" in commands and "simreg" not in section
    assert "Suite running time: 10.0 min" in section


def test_a_dense_run_that_rebuilt_another_vit_teacher_shows_it_and_labels_its_cells(tmp_path):
    """The ViT teacher is rebuilt by each fresh invocation; trained at another thread count it is another teacher
    (25.85 % kNN against 25.0): it gets its own row with its thread count, the cells distilled from it name it, and
    its command carries OMP_NUM_THREADS."""
    import render

    results = tmp_path / "results"
    results.mkdir()
    _fake_dense_results(results)
    base = json.loads((results / "quality_dense.json").read_text())
    teacher = {**base["reference"]["vit_teacher"], "knn_top1": 25.85, "threads": 2,
               "command": "distillctl pretrain --method mae --rebuilt"}
    row = {"kind": "distill", "status": "done", "budget": 120000, "preset": "auto", "knn_top1": 27.5, "linear_top1": 36.0,
           "train_wall_s": 400.0, "images_per_sec": 60.0, "method": "mae-lite", "teacher": "vit", "threads": 1,
           "student": "vit_tiny_patch16_224(patch_size=8)", "command": "distillctl run --method mae-lite --epochs 12"}
    extra = {**base, "command": "python benchmarks/quality.py --suite dense --budget-images 120000", "elapsed_s": 1,
             "finished_utc": "2026-12-02T07:00:00Z", "rows": {"m": row}, "reference": {"vit_teacher": teacher}}
    (results / "quality_vit_120k.json").write_text(json.dumps(extra))
    merged = render.dense_quality(results)
    assert merged["reference"]["vit_teacher"]["knn_top1"] == 25.0
    assert [t["knn_top1"] for t in merged["reference"]["vit_teacher_rebuilds"]] == [25.85]
    assert merged["rows"]["m"]["vit_teacher_rebuild"] == 2 and "vit_teacher_rebuild" not in merged["rows"]["attn"]
    text = render.render(results, tmp_path / "RESULTS.md", plots_enabled=False, measured=None, readme=None)
    section = text[text.index("## Dense features"):]
    section = section[:section.index("\n## ", 3)]
    assert ("| ViT teacher, rebuild 2 (`quality_vit_120k.json`, 2 thread(s)): `distillctl pretrain --method mae` | "
            "`vit_small_patch16_224(patch_size=8)` | – | 50,000 | 25.9 |") in section
    assert "| mae-lite [auto] | `vit_tiny_patch16_224(patch_size=8)` | ViT teacher (mae, rebuild 2) | 120,000 |" in section
    assert "| attndistill [auto] | `vit_tiny_patch16_224(patch_size=8)` | ViT teacher (mae) | 30,000 |" in section
    commands = section[section.index("Exact commands"):]
    assert "\nOMP_NUM_THREADS=2 distillctl pretrain --method mae --rebuilt " in commands
    assert "\nOMP_NUM_THREADS=1 distillctl run --method mae-lite --epochs 12" in commands
    assert "\ndistillctl pretrain --method mae " in commands  # the first teacher: no thread count recorded

    # a third run reading the same rebuild (a control cell in its own file) joins rebuild 2, no new row
    third = {**extra, "rows": {"c": {**row, "method": "compress-1q"}}, "finished_utc": "2026-12-02T08:00:00Z"}
    (results / "quality_vit_control.json").write_text(json.dumps(third))
    merged = render.dense_quality(results)
    assert len(merged["reference"]["vit_teacher_rebuilds"]) == 1
    assert merged["rows"]["c"]["vit_teacher_rebuild"] == merged["rows"]["m"]["vit_teacher_rebuild"] == 2
    (results / "quality_vit_control.json").unlink()

    # a run whose "ViT teacher" is another spec (plain MAE on the ViT student, the SSL-only baseline) is not a rebuild
    plain = {**teacher, "student": "vit_tiny_patch16_224(patch_size=8)", "budget": 30000, "knn_top1": 24.0}
    (results / "quality_vit_ssl.json").write_text(json.dumps({**extra, "rows": {}, "reference": {"vit_teacher": plain}}))
    text = render.render(results, tmp_path / "RESULTS.md", plots_enabled=False, measured=None, readme=None)
    assert ("| SSL-only ViT (pretrain, no teacher) (`quality_vit_ssl.json`, 2 thread(s)): `distillctl pretrain --method "
            "mae` | `vit_tiny_patch16_224(patch_size=8)` | – | 30,000 | 24.0 |") in text
    assert "ViT teacher, rebuild 2 (`quality_vit_120k.json`" in text
    (results / "quality_vit_ssl.json").unlink()
    # read before the rebuild (its file sorts first), the other spec takes no rebuild number: the rebuild stays 2,
    # and cells distilled from the other spec's ViT name that spec
    ssl_cell = {**row, "method": "attndistill"}
    (results / "quality_vit_0ssl.json").write_text(json.dumps({**extra, "rows": {"s": ssl_cell},
                                                               "reference": {"vit_teacher": plain}}))
    merged = render.dense_quality(results)
    assert [t.get("number") for t in merged["reference"]["vit_teacher_rebuilds"]] == [None, 2]
    assert merged["rows"]["m"]["vit_teacher_rebuild"] == 2
    assert merged["rows"]["s"]["vit_teacher_spec"] == "mae:vit_tiny_patch16_224(patch_size=8):30000"
    text = render.render(results, tmp_path / "RESULTS.md", plots_enabled=False, measured=None, readme=None)
    assert "ViT teacher, rebuild 2 (`quality_vit_120k.json`" in text and "rebuild 3" not in text
    assert "| ViT teacher (mae:vit_tiny_patch16_224(patch_size=8):30000) | 120,000 |" in text
    (results / "quality_vit_0ssl.json").unlink()

    # the same teacher again (equal scores) is not a rebuild: the cells keep the plain label
    (results / "quality_vit_120k.json").write_text(json.dumps({**extra, "reference": {
        "vit_teacher": base["reference"]["vit_teacher"]}}))
    again = render.dense_quality(results)
    assert "vit_teacher_rebuilds" not in again["reference"] and "vit_teacher_rebuild" not in again["rows"]["m"]


def test_main_table_gets_dense_columns_when_cells_have_them(tmp_path):
    import render

    from test_benchmarks import _fake_results

    results = tmp_path / "results"
    results.mkdir()
    _fake_results(results)
    plain = render.render(results, tmp_path / "A.md", plots_enabled=False, measured=None, readme=None)
    assert "dense mIoU %" not in plain.split("## Dense features")[0]
    quality = json.loads((results / "quality.json").read_text())
    quality["rows"]["a"]["dense"] = _dense(33.0)
    (results / "quality.json").write_text(json.dumps(quality))
    text = render.render(results, tmp_path / "B.md", plots_enabled=False, measured=None, readme=None)
    assert "| kNN top-1 % | linear top-1 % | dense mIoU % | dense pixel acc % | kNN student/teacher |" in text
    assert "| 40.0 | 45.0 | 33.0 | 43.0 | 0.50 |" in text  # simreg's row
    assert "| 30.0 | 35.0 | – | – |" in text  # seed: no probe


@pytest.mark.slow
def test_dense_suite_quick_runs_and_resumes(tmp_path):
    """Every kind of row for real on tiny data: distillation cells (CNN and ViT students), the ViT teacher pretrained
    by the suite, the teachers and random-init students, each with kNN, linear and the dense probe; a second
    invocation finds everything finished."""
    shared = _shared(tmp_path, "resnet10t", real_teacher=True)
    env = _env(tmp_path, shared)
    args = ["--suite", "dense", "--quick", "--threads", "1", "--students", "test_resnet", "--budget-images", "64",
            "--batch-size", "16", "--dense-mosaics", "24", "--dense-val-mosaics", "8", "--dense-epochs", "2",
            "--vit-teacher", "mae:vit_tiny_patch16_224(patch_size=8, depth=1, num_heads=6):64"]
    proc = _run(*args, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "results" / "quality_dense_quick.json").read_text())
    rows = result["rows"]
    assert sorted((r["method"], r["teacher"], r["student"]) for r in rows.values()) == sorted([
        ("pcd", "sup", "test_resnet"), ("dense-reg", "sup", "test_resnet"), ("compress-1q", "sup", "test_resnet"),
        ("compress-1q", "sup", "vit_tiny_patch16_224(patch_size=8, depth=1)"),
        ("attndistill", "vit", "vit_tiny_patch16_224(patch_size=8, depth=1)"),
        ("mae-lite", "vit", "vit_tiny_patch16_224(patch_size=8, depth=1)")])
    for row in rows.values():
        assert row["status"] == "done", row
        assert 0 <= row["knn_top1"] <= 100 and 0 <= row["linear_top1"] <= 100
        assert 0 <= row["dense"]["miou"] <= 100 and 0 <= row["dense"]["pixel_accuracy"] <= 100, row["dense"]
        # 64 px mosaics: the ViT's 8 px patches give 8x8 cells, test_resnet's stride 32 gives 2x2
        assert row["dense"]["feature_grid"] == ([8, 8] if "vit" in row["student"] else [2, 2])
        assert row["dense"]["command"].startswith("distillctl eval dense ") and "--mosaics 24" in row["dense"]["command"]
    reference = result["reference"]
    assert set(reference) >= {"teacher", "random:test_resnet", "random:vit_tiny_patch16_224(patch_size=8, depth=1)",
                              "vit_teacher"}
    for name in ("teacher", "random:test_resnet", "random:vit_tiny_patch16_224(patch_size=8, depth=1)", "vit_teacher"):
        assert reference[name]["knn_top1"] is not None and reference[name]["linear_top1"] is not None, name
        assert reference[name]["dense"]["miou"] is not None, (name, reference[name]["dense"])
    assert reference["vit_teacher"]["method"] == "mae" and reference["vit_teacher"]["steps"] == 4

    again = _run(*args, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert ": distillctl " not in again.stderr  # every cell, teacher and probe was found finished
    assert json.loads((tmp_path / "results" / "quality_dense_quick.json").read_text())["rows"] == rows


def test_reference_cell_reuses_the_finished_table_cell(tmp_path, monkeypatch):
    """compress-1q is dense-probed from the quality table's own cell (one from before method.preset included) with
    the command it ran with, instead of being trained again; without one it is a new cell."""
    import quality

    monkeypatch.setattr(quality, "WORK", tmp_path / "work")
    monkeypatch.setattr(quality, "RESULTS", tmp_path / "results")
    args = quality.parse_args(["--suite", "dense"])
    data = {"train_images": 10_000}
    cell = next(c for c in quality.plan_dense_cells(args, METHODS) if c.get("role") == "reference")
    assert quality.reuse_table_cell(cell, args, data) == cell  # nothing finished: trained by the suite
    legacy = tmp_path / "work" / "quality" / "mobilenetv2_100" / "sup" / "compress-1q-30000"
    legacy.mkdir(parents=True)
    summary = {"recipe": {"train": {"max_steps": 468}, "method": {}}, "student": {"knn_top1": 37.6},
               "train": {"steps": 468}}
    (legacy / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "quality.json").write_text(json.dumps(
        {"rows": {"mobilenetv2_100/sup/compress-1q-30000": {"command": "distillctl run --method compress-1q --lr 0.05"}}}))
    reused = quality.reuse_table_cell(cell, args, data)
    assert reused["dir"] == str(legacy) and reused["preset"] is None
    assert reused["recorded_command"] == "distillctl run --method compress-1q --lr 0.05"
    summary["train"]["steps"] = 100  # an unfinished cell is not reused
    (legacy / "summary.json").write_text(json.dumps(summary))
    assert quality.reuse_table_cell(cell, args, data) == cell
