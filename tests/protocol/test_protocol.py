"""Benchmark protocols (``distillctl protocol``): the shipped arXiv 2110.11160 protocol, planning, bad input, the
results table, and (slow) the whole CPU variant end to end with resume after a deleted marker and after a kill."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillctl import schemas
from distillctl.errors import InputError, UsageError
from distillctl.protocol import ProtocolInputs, budget_schedule, find_protocol, load_protocol, plan
from distillctl.protocol_results import render_markdown
from tests.conftest import run_cli

COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])


def _image(rng: np.random.Generator, label: int) -> Image.Image:
    pixels = COLOURS[label][None, None, :] + rng.normal(0, 40, (12, 12, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_data(root: Path) -> dict[str, str]:
    """32 unlabelled images in a flat folder, a labelled 3-class train (8 each) and test (4 each) split."""
    rng = np.random.default_rng(0)
    (root / "unlabelled").mkdir(parents=True)
    for index in range(32):
        _image(rng, index % 3).save(root / "unlabelled" / f"u{index:03d}.png")
    for split, count in (("train", 8), ("test", 4)):
        for label in range(3):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                _image(rng, label).save(folder / f"{index}.png")
    return {"data": str(root / "unlabelled"), "eval_train": str(root / "train"), "eval_val": str(root / "test")}


def _run_args(data: dict[str, str], out: Path, *extra: str) -> list[str]:
    return ["protocol", "run", "lightweight-ssl_cpu", "--data", data["data"], "--eval-train", data["eval_train"],
            "--eval-val", data["eval_val"], "--out", str(out), *extra]


def _one_error_line(result, code: int, fragment: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_lightweight_ssl_is_the_papers_grid() -> None:
    from distillctl.students import resolve_arch

    spec = load_protocol("lightweight-ssl")
    assert spec.grid.methods == ["mocov2", "simclr", "byol"]
    assert [resolve_arch(a) for a in spec.grid.archs] == ["mobilenetv2_100", "efficientnet_lite0",
                                                          "tv:shufflenet_v2_x1_0", "tv:squeezenet1_1", "resnet18"]
    assert spec.data.image_size == 96 and spec.budget.images == 10_000_000 and spec.budget.warmup_fraction == 0.1
    assert any("budget" in text for text in spec.assumptions) and any("optimiser" in text for text in spec.assumptions)
    cpu = load_protocol("lightweight-ssl_cpu")
    assert len(cpu.grid.methods) * len(cpu.grid.archs) == 4


def test_budget_schedule() -> None:
    assert budget_schedule(64, 16, 32) == {"epochs": 2, "max_steps": None, "warmup_epochs": 0.0}  # 4 steps, 2 epochs
    assert budget_schedule(100, 16, 32) == {"epochs": 4, "max_steps": 7, "warmup_epochs": 0.0}  # 7 steps, 2 per epoch
    # the full protocol: 39,063 steps of 390 per epoch; warm-up = 10% of the steps = 3,906.3 steps = 10.016 epochs
    assert budget_schedule(10_000_000, 256, 100_000, 0.1) == {"epochs": 101, "max_steps": 39063,
                                                              "warmup_epochs": 10.016154}
    assert budget_schedule(10, 16, 8) == {"epochs": 1, "max_steps": None, "warmup_epochs": 0.0}  # 1 step


def test_budget_keys_cannot_be_set_in_train(tmp_path: Path) -> None:
    spec = find_protocol("lightweight-ssl").read_text().replace("  seed: 0\n", "  seed: 0\n  epochs: 200\n")
    (tmp_path / "epochs.yaml").write_text(spec)
    with pytest.raises(UsageError, match="epochs follow from budget"):
        load_protocol(str(tmp_path / "epochs.yaml"))


def test_plan_applies_overrides_and_budget(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data")
    spec = load_protocol("lightweight-ssl_cpu")
    planned = plan(spec, ProtocolInputs(**data, out=tmp_path / "out", budget_images=80, methods=("byol",),
                                        archs=("shufflenetv2", "squeezenet"), image_size=32))
    assert [(c.method, c.arch) for c in planned.cells] == [("byol", "tv:shufflenet_v2_x1_0"), ("byol", "tv:squeezenet1_1")]
    recipe = planned.recipe(planned.cells[1])
    assert (recipe.train.epochs, recipe.train.max_steps, recipe.train.batch_size) == (3, 5, 16)
    assert recipe.data.image_size == 32 and recipe.data.val is None and recipe.teacher.source == "none"
    assert recipe.method.params == {"projector_hidden_dim": 64, "projection_dim": 32, "predictor_hidden_dim": 64,
                                    "flip": False}
    assert planned.run_dir(planned.cells[1]) == tmp_path / "out" / "runs" / "byol__tv-squeezenet1_1"
    assert not (tmp_path / "out").exists()  # planning writes nothing
    # an ImageFolder is pre-training data too (its labels are ignored); an alias and its name are one arch
    labelled = plan(spec, ProtocolInputs(data=data["eval_train"], eval_train=data["eval_train"],
                                         eval_val=data["eval_val"], out=tmp_path / "out",
                                         archs=("squeezenet", "tv:squeezenet1_1"), methods=("byol", "byol")))
    assert labelled.dataset_size == 24 and [(c.method, c.arch) for c in labelled.cells] == [("byol", "tv:squeezenet1_1")]


def test_run_cell_holds_the_run_lock_through_evaluation_and_the_summary(tmp_path: Path, monkeypatch) -> None:
    """Training, evaluation and the summary/marker writes of a cell are one locked section: another process is
    refused (exit 2) until the cell's summary is written, not only while it trains."""
    import distillctl.pipeline
    import distillctl.protocol as protocol
    import distillctl.students
    from distillctl.runlock import holder

    data = make_data(tmp_path / "data")
    planned = plan(load_protocol("lightweight-ssl_cpu"),
                   ProtocolInputs(**data, out=tmp_path / "out", methods=("byol",), archs=("squeezenet",)))
    cell = planned.cells[0]
    run_dir = planned.run_dir(cell)
    seen: dict[str, object] = {}

    def fake_pipeline(recipe, options):  # training is tested end to end below; here only the lock's extent
        seen["training"] = holder(run_dir)
        (run_dir / "summary.json").write_text("{}")

    def fake_evaluate(*args, **kwargs):
        seen["evaluating"] = holder(run_dir)
        return {"knn_top1": 50.0}

    monkeypatch.setattr(distillctl.pipeline, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(distillctl.students, "load_student", lambda path: (None, type("C", (), {
        "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3})()))
    monkeypatch.setattr(protocol, "evaluate_encoder", fake_evaluate)
    summary = protocol.run_cell(planned, cell, quiet=True)
    assert seen["training"]["pid"] == os.getpid() and seen["evaluating"]["pid"] == os.getpid()
    assert summary["protocol"]["eval"] == {"knn_top1": 50.0}
    assert not _lock_is_held(run_dir)  # released afterwards


def _lock_is_held(directory: Path) -> bool:
    import fcntl

    with open(directory / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@pytest.mark.parametrize("change, error, fragment", [
    ({"archs": ("mobilenetv9",)}, UsageError, "unknown student architecture 'mobilenetv9'"),
    ({"archs": ("tv:squeezenet7",)}, UsageError, "unknown torchvision student architecture"),
    ({"methods": ("simreg",)}, UsageError, "simreg is a distillation method"),
    ({"methods": ("mocov3",)}, UsageError, "unknown method 'mocov3'"),
    ({"image_size": 16}, UsageError, "at least 17 px"),  # SqueezeNet 1.1 is in the grid
    ({"data": "/nonexistent/unlabelled"}, InputError, "--data /nonexistent/unlabelled does not exist"),
])
def test_plan_refuses_bad_input(tmp_path: Path, change: dict, error: type, fragment: str) -> None:
    data = make_data(tmp_path / "data")
    inputs = {**data, "out": tmp_path / "out", **change}
    with pytest.raises(error, match=fragment.replace("(", r"\(")):
        plan(load_protocol("lightweight-ssl_cpu"), ProtocolInputs(**inputs))
    assert not (tmp_path / "out").exists()


def test_fewer_images_than_a_batch_is_refused_up_front(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data")
    with pytest.raises(InputError, match="has 12 images, fewer than one batch of 16"):
        plan(load_protocol("lightweight-ssl_cpu"), ProtocolInputs(**{**data, "data": data["eval_val"]},
                                                                  out=tmp_path / "out"))


def test_flat_evaluation_split_is_refused(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data")
    with pytest.raises(InputError, match="two or more class folders"):
        plan(load_protocol("lightweight-ssl_cpu"), ProtocolInputs(data=data["data"], eval_train=data["data"],
                                                                  eval_val=data["data"], out=tmp_path / "out"))


def test_protocol_files_are_plain_data(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_protocol(str(path))
    spec = find_protocol("lightweight-ssl_cpu").read_text()
    (tmp_path / "typo.yaml").write_text(spec.replace("method_params:", "method_param:"))
    with pytest.raises(UsageError, match="unknown key 'method_param'"):
        load_protocol(str(tmp_path / "typo.yaml"))
    (tmp_path / "train.yaml").write_text(spec.replace("optimizer: sgd", "optimiser: sgd"))
    with pytest.raises(UsageError, match="unknown key 'train.optimiser'"):
        load_protocol(str(tmp_path / "train.yaml"))


def test_markdown_table_shows_recorded_numbers() -> None:
    results = {"protocol": "p", "title": "T", "source": "S", "assumptions": ["a1"], "complete": False,
               "inputs": {"data": "d", "data_images": 1000, "budget_images": 5000, "image_size": 24,
                          "eval_train": "tr", "eval_val": "te"},
               "eval": {"knn_k": [5], "knn_temperature": 0.07, "linear_epochs": 5},
               "floors": {"resnet18": {"knn_top1": 31.25, "linear_top1": 40.0}},
               "rows": [{"method": "byol", "arch": "resnet18", "status": "done", "knn_top1": 55.55, "linear_top1": 60.04},
                        {"method": "simclr", "arch": "resnet18", "status": "not run"}]}
    text = render_markdown(results)
    assert "| arch | random init | byol | simclr |" in text
    assert "| resnet18 | 31.2 | 55.5 | – |" in text or "| resnet18 | 31.3 | 55.5 | – |" in text
    assert "| resnet18 | 40.0 | 60.0 | – |" in text
    assert "- a1" in text and "Not run yet: simclr × resnet18" in text


def test_cli_bad_input_exit_2_nothing_written(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    _one_error_line(run_cli("protocol", "run", "lightweight-sll", "--data", data["data"], "--eval-train",
                            data["eval_train"], "--eval-val", data["eval_val"], "--out", str(out)),
                    2, "unknown protocol 'lightweight-sll'")
    _one_error_line(run_cli(*_run_args({**data, "data": str(tmp_path / "missing")}, out)), 2, "does not exist")
    _one_error_line(run_cli(*_run_args(data, out, "--archs", "squeezenet,resnet9000")), 2,
                    "unknown student architecture 'resnet9000'")
    assert not out.exists()


def test_cli_list_and_show() -> None:
    listed = run_cli("protocol", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    names = {row["name"]: row for row in json.loads(listed.stdout)["protocols"]}
    assert names["lightweight-ssl"]["cells"] == 15 and "lightweight-ssl_cpu" in names
    shown = run_cli("protocol", "show", "lightweight-ssl")
    assert shown.returncode == 0 and "ASSUMPTIONS" in shown.stdout and "arXiv 2110.11160" in shown.stdout
    helped = run_cli("protocol", "run", "--help")
    assert helped.returncode == 0 and "assumptions" in helped.stdout and "2110.11160" in helped.stdout


# --- end to end (slow) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """One complete run of lightweight-ssl_cpu through the CLI (its --json report and where it lives)."""
    root = tmp_path_factory.mktemp("protocol")
    data = make_data(root / "data")
    result = run_cli(*_run_args(data, root / "out", "--json"))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"data": data, "out": root / "out", "results": json.loads(result.stdout), "root": root}


@pytest.mark.slow
def test_end_to_end_table_comes_from_the_runs(finished: dict) -> None:
    out, results = finished["out"], finished["results"]
    assert results["complete"] and len(results["rows"]) == 4
    assert json.loads((out / "results.json").read_text()) == results
    markdown = (out / "results.md").read_text()
    for row in results["rows"]:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        recorded = summary["protocol"]["eval"]
        assert (row["knn_top1"], row["linear_top1"], row["knn"]) == (recorded["knn_top1"], recorded["linear_top1"],
                                                                    recorded["knn"])
        assert summary["train"]["images_seen"] == row["images_seen"] == 64  # the budget
        assert summary["student"]["arch"] == row["arch"] and summary["method"] == row["method"]
        assert recorded["data"]["n_train"] == 24 and recorded["data"]["n_val"] == 12
        schemas.validate(summary, "summary")  # the protocol key is part of the documented summary
        assert 0.0 <= row["knn_top1"] <= 100.0 and 0.0 <= row["linear_top1"] <= 100.0
        config = json.loads((Path(row["run_dir"]) / "student" / "config.json").read_text())
        assert config["library"] == ("torchvision" if row["arch"].startswith("tv:") else "timm")
    for arch in ("tv:squeezenet1_1", "mobilenetv2_100"):
        floor = json.loads((out / "floors" / f"{arch.replace(':', '-')}.json").read_text())["eval"]
        assert results["floors"][arch] == {"knn_top1": floor["knn_top1"], "knn": floor["knn"],
                                           "linear_top1": floor["linear_top1"]}
        assert f"| {arch} | {floor['knn_top1']:.1f} |" in markdown
    # kNN on 12 queries moves in steps of 1/12: every score is a multiple of 8.333 %
    assert all(abs(v * 12 / 100 - round(v * 12 / 100)) < 1e-3 for v in [r["knn_top1"] for r in results["rows"]])


@pytest.mark.slow
def test_deleted_marker_reruns_only_that_cell(finished: dict) -> None:
    out, data = finished["out"], finished["data"]
    runs = out / "runs"
    before = {cell.name: (cell / "summary.json").stat().st_mtime_ns for cell in runs.iterdir()}
    (runs / "byol__mobilenetv2_100" / "protocol_cell.json").unlink()
    result = run_cli(*_run_args(data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stderr.splitlines()
               if line.startswith("protocol: cell") and line.endswith("finished earlier with the same inputs; skipped")]
    assert len(skipped) == 3 and not any("byol × mobilenetv2_100" in line for line in skipped)
    after = {cell.name: (cell / "summary.json").stat().st_mtime_ns for cell in runs.iterdir()}
    assert [name for name in before if after[name] != before[name]] == ["byol__mobilenetv2_100"]
    assert (runs / "byol__mobilenetv2_100" / "protocol_cell.json").is_file()
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["rows"] == finished["results"]["rows"]  # the training stage was finished: same student, same numbers


@pytest.mark.slow
def test_killed_cell_resumes_bit_identical(finished: dict) -> None:
    out = finished["root"] / "killed"
    killed = run_cli(*_run_args(finished["data"], out), env={"DISTILLCTL_TEST_KILL_AT_STEP": "3"})
    assert killed.returncode == 137, killed.stderr[-2000:]
    first = out / "runs" / "simclr__tv-squeezenet1_1"
    assert not (first / "protocol_cell.json").exists() and not (out / "runs" / "simclr__mobilenetv2_100").exists()
    resumed = run_cli(*_run_args(finished["data"], out, "--json"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((first / "summary.json").read_text())
    assert summary["train"]["resumed_from_step"] == 2  # the checkpoint of step 2 (checkpoint_every_steps: 2)
    reference = {row["run_dir"].rsplit("/", 1)[-1]: row for row in finished["results"]["rows"]}
    for row in json.loads(resumed.stdout)["rows"]:
        same = reference[row["run_dir"].rsplit("/", 1)[-1]]
        assert row["student_sha256"] == same["student_sha256"]  # exact resume: the uninterrupted weights
        assert (row["knn_top1"], row["linear_top1"]) == (same["knn_top1"], same["linear_top1"])
