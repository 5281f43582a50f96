"""Export is transactional: a failure late in a re-export (the OpenVINO conversion after the new ONNX was written,
the model card, the summary) leaves the previous ``export/`` and summary.json byte-identical and no stage behind;
a successful one replaces ``export/`` whole."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from distillctl.errors import InputError
from distillctl.export import _fs

DATA = "builtin:digits"
FAST = ["--data", DATA, "--parity-images", "8", "--exporter", "legacy"]


def _cli(args: list[str]) -> int:
    from distillctl.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
        raise SystemExit(0)
    return int(info.value.code)


def _state(run: Path) -> dict[str, str]:
    """The run's top-level entries and the sha256 of every file under export/ plus summary.json."""
    files = [*sorted((run / "export").rglob("*")), run / "summary.json"]
    state = {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}
    return {**state, "entries": ",".join(sorted(p.name for p in run.iterdir()))}


@pytest.fixture(scope="module")
def exported_run(run_dir: Path, tmp_path_factory) -> Path:
    """A run with a finished ONNX export (the "previous export" every test starts from)."""
    run = tmp_path_factory.mktemp("transaction") / "run"
    shutil.copytree(run_dir / "student", run / "student")
    shutil.copy(run_dir / "summary.json", run / "summary.json")
    # the dynamo exporter here, the legacy one in the tests: a new student.onnx differs from this one in its bytes
    assert _cli(["export", str(run), "--format", "onnx", "--data", DATA, "--parity-images", "8"]) == 0
    return run


def _copy(exported_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(exported_run, copy)
    return copy


def _fail_openvino(monkeypatch) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import distillctl.export.openvino as openvino

    def rejected(onnx_path, xml_path):  # what convert_ir raises for a graph OpenVINO's frontend refuses
        raise InputError(f"OpenVINO cannot convert {Path(onnx_path).name}: AvgPool kernel larger than the input")

    monkeypatch.setattr(openvino, "convert_ir", rejected)


def _fail_card(monkeypatch) -> None:
    import distillctl.export.card as card

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(card, "write_model_card", disk_full)


def _fail_summary(monkeypatch) -> None:
    """The summary write fails after the new export/ was swapped in: the swap is undone."""
    import distillctl.export.api as api

    swapped: list[bool] = []

    def disk_full(run_dir, report):
        swapped.append((Path(run_dir) / "export" / "student.fp16.onnx").is_file())  # the new folder is in place
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api, "_merge_summary", disk_full)
    return swapped


@pytest.mark.parametrize("fail, formats, code", [
    (_fail_openvino, "onnx,openvino", 2),  # conversion refused after the new student.onnx was written
    (_fail_card, "onnx,onnx-fp16", 1),  # every artefact written, the model card is not
    (_fail_summary, "onnx,onnx-fp16", 1),  # swapped in, then the report cannot be written
], ids=["openvino-conversion", "model-card", "summary"])
def test_a_late_failure_keeps_the_previous_export(exported_run: Path, tmp_path: Path, monkeypatch, capsys,
                                                  fail, formats: str, code: int) -> None:
    run = _copy(exported_run, tmp_path)
    before = _state(run)
    assert json.loads((run / "summary.json").read_text())["export"]["onnx"]["exporter"] == "dynamo"
    observed = fail(monkeypatch)
    assert _cli(["export", str(run), "--format", formats, *FAST]) == code
    assert observed in (None, [True])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert _state(run) == before  # same files, same bytes, no .staging-export-* left


def test_a_success_replaces_the_export_whole(exported_run: Path, tmp_path: Path) -> None:
    run = _copy(exported_run, tmp_path)
    (run / "export" / "student.stale.onnx").write_bytes(b"from an older export")  # not this export's: gone after
    assert _cli(["export", str(run), "--format", "onnx,onnx-fp16", *FAST]) == 0
    assert sorted(p.name for p in (run / "export").iterdir()) == ["model_card.json", "student.fp16.onnx",
                                                                  "student.onnx"]
    assert not list(run.glob(".staging-*"))
    report = json.loads((run / "summary.json").read_text())["export"]
    assert report["onnx"]["path"] == "export/student.onnx" and report["onnx-fp16"]["path"] == "export/student.fp16.onnx"
    card = json.loads((run / "export" / "model_card.json").read_text())
    for name, described in card["artifacts"].items():  # the card vouches for the files that are there
        assert described["sha256"] == hashlib.sha256((run / "export" / name).read_bytes()).hexdigest()


def test_a_stage_left_by_a_kill_is_cleaned_and_an_old_export_put_back(tmp_path: Path) -> None:
    """Killed between a commit's two renames: export/ is missing and its previous content sits in the stage."""
    stale = tmp_path / ".staging-export-dead1"
    (stale / "export.old").mkdir(parents=True)
    (stale / "export.old" / "student.onnx").write_bytes(b"previous")
    (stale / "export").mkdir()
    (stale / "export" / "student.onnx").write_bytes(b"half of a new one")
    other = tmp_path / ".staging-export-dead2" / "export"
    other.mkdir(parents=True)
    stage = _fs.StagedDirectory(tmp_path / "export")
    assert (tmp_path / "export" / "student.onnx").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", stage.root.name])
    stage.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def _stage_with(tmp_path: Path, old: bytes | None, new: bytes) -> _fs.StagedDirectory:
    if old is not None:
        (tmp_path / "export").mkdir()
        (tmp_path / "export" / "student.onnx").write_bytes(old)
    stage = _fs.StagedDirectory(tmp_path / "export")
    (stage.path / "student.onnx").write_bytes(new)
    return stage


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_commit_swaps_in_one_step_so_the_export_never_goes_missing(tmp_path: Path, monkeypatch) -> None:
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir(), probe_b.mkdir()
    (probe_a / "x").write_text("a")
    if not _fs.exchange(probe_a, probe_b):
        pytest.skip("this file system refuses RENAME_EXCHANGE")
    assert (probe_b / "x").read_text() == "a" and not (probe_a / "x").exists()  # swapped, both still exist
    (tmp_path / "run").mkdir()
    stage = _stage_with(tmp_path / "run", b"previous", b"new")

    def no_two_step_rename(*args):
        raise AssertionError("the old export was renamed aside: export/ would be missing for a moment")

    monkeypatch.setattr(_fs.os, "rename", no_two_step_rename)
    seen = []
    stage.commit(then=lambda: seen.append((tmp_path / "run" / "export" / "student.onnx").read_bytes()))
    assert seen == [b"new"] and (tmp_path / "run" / "export" / "student.onnx").read_bytes() == b"new"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["export"]  # the old content went with the stage


def test_a_failing_report_puts_the_old_export_back(tmp_path: Path) -> None:
    stage = _stage_with(tmp_path, b"previous", b"new")

    def report():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        stage.commit(then=report)
    assert (tmp_path / "export" / "student.onnx").read_bytes() == b"previous"
    stage.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize("old", [b"previous", None])
def test_without_an_atomic_exchange_the_two_renames_do_the_same(tmp_path: Path, monkeypatch, old) -> None:
    monkeypatch.setattr(_fs, "exchange", lambda first, second: False)  # another OS or file system
    stage = _stage_with(tmp_path, old, b"new")
    stage.commit()
    assert (tmp_path / "export" / "student.onnx").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    failing = _stage_with(tmp_path, None, b"newer")
    with pytest.raises(RuntimeError):
        failing.commit(then=lambda: (_ for _ in ()).throw(RuntimeError("report failed")))
    assert (tmp_path / "export" / "student.onnx").read_bytes() == b"new"
