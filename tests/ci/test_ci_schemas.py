"""Machine-readable everywhere (issue 17 §5): every verb has --json; the shipped JSON Schemas validate real outputs
(and reject broken ones)."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from distillctl import schemas
from tests.conftest import run_cli


def _leaf_commands():
    import typer.main

    from distillctl.cli import app

    def walk(command, path):
        if hasattr(command, "list_commands"):
            for name in command.list_commands(None):
                yield from walk(command.get_command(None, name), [*path, name])
        else:
            yield " ".join(path), command

    yield from walk(typer.main.get_command(app), [])


def test_every_verb_has_json():
    missing = [path for path, command in _leaf_commands()
               if not any("--json" in getattr(param, "opts", []) for param in command.params)]
    assert missing == []


def test_schema_verb_prints_the_shipped_schemas():
    listed = run_cli("schema", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)["schemas"] == \
        ["bench", "bundle_manifest", "model_card", "summary"]
    printed = run_cli("schema", "summary")
    assert json.loads(printed.stdout) == schemas.load("summary")
    for name in schemas.names():
        jsonschema.Draft202012Validator.check_schema(schemas.load(name))
    assert run_cli("schema", "summry").returncode == 2


@pytest.mark.slow
def test_real_outputs_follow_their_schemas(ci_run, ci_run_copy, tmp_path):
    out, summary, _ = ci_run
    schemas.validate(summary, "summary")
    schemas.validate(json.loads((out / "summary.json").read_text()), "summary")
    schemas.validate(json.loads((out / "export" / "model_card.json").read_text()), "model_card")
    bench = run_cli("bench", str(ci_run_copy), "--formats", "torch,onnx,onnx-int8", "--batch", "1,4", "--repeats", "3",
                    "--warmup", "1", "--json")
    assert bench.returncode == 0, bench.stderr[-2000:]
    schemas.validate(json.loads(bench.stdout), "bench")
    bundle = run_cli("export", str(ci_run_copy), "--format", "onnx", "--parity-images", "8", "--bundle", str(tmp_path / "b"))
    assert bundle.returncode == 0, bundle.stderr[-2000:]
    schemas.validate(json.loads((tmp_path / "b" / "manifest.json").read_text()), "bundle_manifest")

    broken = copy.deepcopy(summary)
    broken["student"]["knn_top1"] = 150.0
    with pytest.raises(jsonschema.ValidationError):
        schemas.validate(broken, "summary")
    broken = copy.deepcopy(summary)
    broken["gates"]["results"] = {"min_student_knn": {"name": "min_student_knn", "passed": True}}
    with pytest.raises(jsonschema.ValidationError):
        schemas.validate(broken, "summary")
