"""Flags reach the recipe with the type Typer gave them: ``--name 2024`` is the string "2024", not YAML's int."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


class _Captured(Exception):
    def __init__(self, recipe) -> None:
        super().__init__("captured")
        self.recipe = recipe


@pytest.fixture
def invoke_run(monkeypatch):
    """Invoke ``distillctl run ARGS`` in-process and return the recipe it would run (no training)."""
    import distillctl.pipeline
    from distillctl.cli import app

    def fake_run_pipeline(recipe, options=None):
        raise _Captured(recipe)

    monkeypatch.setattr(distillctl.pipeline, "run_pipeline", fake_run_pipeline)

    def invoke(*args: str):
        result = CliRunner().invoke(app, ["run", "--method", "simreg", "--teacher", "timm:resnet18", *args])
        assert isinstance(result.exception, _Captured), (result.exception, result.output)
        return result.exception.recipe

    return invoke


@pytest.mark.parametrize("name", ["2024", "on", "off", "null", "1e3", "0x10", "[a]", "a: b"])
def test_name_flag_keeps_its_text(invoke_run, name):
    assert invoke_run("--name", name).name == name


@pytest.mark.parametrize("out", ["runs/2024", "on", "runs/a: b", "runs/#x", "runs/[x]", "runs/{y}", "~", "a=b",
                                 "runs/with space"])
def test_out_flag_with_odd_names(invoke_run, out):
    assert invoke_run("--out", out).out == out


def test_typed_flags_and_set_together(invoke_run):
    recipe = invoke_run("--epochs", "3", "--lr", "0.5", "--export", "onnx, onnx-int8", "--channels-last",
                        "--set", "train.lr=0.25", "--set", "method.params.crop_scale=[0.3, 1.0]")
    assert recipe.train.epochs == 3 and recipe.train.lr == 0.25  # --set is applied after the flags
    assert recipe.export.formats == ["onnx", "onnx-int8"] and recipe.train.channels_last is True
    assert recipe.method.typed_params.crop_scale == (0.3, 1.0)


def test_extra_teacher_flag_becomes_a_list_of_sections(invoke_run):
    recipe = invoke_run("--method", "simreg-multi", "--extra-teacher", "a b.pth@resnet50", "--extra-teacher", "r50-barlow")
    assert [(e.source, e.arch) for e in recipe.teacher.extra] == [("a b.pth", "resnet50"), ("r50-barlow", None)]
