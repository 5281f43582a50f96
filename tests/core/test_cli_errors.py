"""Bad input → one clear line on stderr, the documented exit code, no traceback, nothing damaged."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, tiny_run_args


def _assert_clean_error(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_missing_data_path(tmp_path, tiny_teacher_file):
    args = tiny_run_args(tiny_teacher_file, tmp_path / "run")
    args[args.index("builtin:digits")] = str(tmp_path / "nope")
    _assert_clean_error(run_cli(*args), 2, "does not exist")
    assert not (tmp_path / "run").exists()


def test_folder_of_non_images(tmp_path, tiny_teacher_file):
    data = tmp_path / "data" / "cls"
    data.mkdir(parents=True)
    (data / "notes.txt").write_text("not an image")
    args = tiny_run_args(tiny_teacher_file, tmp_path / "run")
    args[args.index("builtin:digits")] = str(tmp_path / "data")
    _assert_clean_error(run_cli(*args), 2, "no images found")


@pytest.mark.parametrize("flag, value, fragment", [
    ("--method", "simregg", "unknown method 'simregg'"),
    ("--student", "mobilenetv9000", "unknown student architecture"),
])
def test_unknown_names(tmp_path, tiny_teacher_file, flag, value, fragment):
    args = tiny_run_args(tiny_teacher_file, tmp_path / "run")
    args[args.index(flag) + 1] = value
    _assert_clean_error(run_cli(*args), 2, fragment)


def test_unknown_recipe_and_bad_values(tmp_path):
    _assert_clean_error(run_cli("run", "--recipe", "quickstrat"), 2, "unknown recipe 'quickstrat'", "quickstart")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -3\n")
    _assert_clean_error(run_cli("run", "--recipe", str(bad)), 2, "train.lr")
    bad.write_text("train: [unclosed\n")
    _assert_clean_error(run_cli("run", "--recipe", str(bad)), 2, "not valid YAML")
    bad.write_text("trainn:\n  lr: 1\n")
    _assert_clean_error(run_cli("run", "--recipe", str(bad)), 2, "unknown key 'trainn'", "train")


def test_unreadable_checkpoint(tmp_path):
    broken = tmp_path / "teacher.safetensors"
    broken.write_bytes(b"\x00garbage" * 10)
    _assert_clean_error(run_cli(*tiny_run_args(broken, tmp_path / "run")), 2, "teacher.safetensors")
    missing = tmp_path / "missing.pth"
    _assert_clean_error(run_cli(*tiny_run_args(missing, tmp_path / "run")), 2, "not found")


def test_checkpoint_architecture_mismatch_reports_keys(tmp_path, tiny_teacher_file):
    args = tiny_run_args(tiny_teacher_file, tmp_path / "run")
    args[args.index("--teacher-arch") + 1] = "resnet34"
    result = run_cli(*args)
    _assert_clean_error(result, 2, "missing")
    assert "layer" in result.stderr  # names the offending keys


def test_bad_input_leaves_existing_run_untouched(tmp_path, tiny_teacher_file):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sentinel = {"keep": True}
    (run_dir / "summary.json").write_text(json.dumps(sentinel))
    (run_dir / "recipe.yaml").write_text("name: old\n")
    args = tiny_run_args(tiny_teacher_file, run_dir)
    args[args.index("--method") + 1] = "nope"
    _assert_clean_error(run_cli(*args), 2, "unknown method")
    assert json.loads((run_dir / "summary.json").read_text()) == sentinel
    assert (run_dir / "recipe.yaml").read_text() == "name: old\n"


def test_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "run", "--recipe", "quickstrat")
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_help_has_examples():
    for command in (["run", "--help"], ["pretrain", "--help"], ["methods", "show", "--help"]):
        result = run_cli(*command)
        assert result.returncode == 0 and "distillctl" in result.stdout


def test_debug_traceback_shows_the_cause(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    plain = run_cli("run", "--recipe", str(bad))
    _assert_clean_error(plain, 2, "not valid YAML")
    debug = run_cli("--debug", "run", "--recipe", str(bad))
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and "ParserError" in debug.stderr, debug.stderr[-3000:]  # yaml's own error


def test_debug_shows_a_cause_hidden_by_from_none():
    from distillctl.cli import _reveal_causes

    try:
        try:
            raise KeyError("inner")
        except KeyError:
            raise ValueError("outer") from None
    except ValueError as exc:
        assert exc.__suppress_context__
        _reveal_causes(exc)
        assert not exc.__suppress_context__ and isinstance(exc.__context__, KeyError)
