"""A teacher sidecar (``<checkpoint stem>.json``) that is present but malformed is an exit-2 error naming it."""

from __future__ import annotations

import json
import shutil

import pytest

from distillctl.errors import InputError
from distillctl.teachers.resolve import _sidecar
from tests.conftest import run_cli


@pytest.mark.parametrize("text, fragment", [
    ('{"arch": "resnet18", "mean": [0.5, 0.5', "not readable JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    ('{"mean": [0.5, 0.5]}', "'mean' must be a list of 3 numbers"),
    ('{"std": "0.2"}', "'std' must be a list of 3 numbers"),
    ('{"input_size": [3, "224", 224]}', "'input_size'"),
    ('{"license": 7}', "'license' must be a string"),
])
def test_malformed_sidecar_names_the_file(tmp_path, text, fragment):
    weights = tmp_path / "r18.safetensors"
    weights.write_bytes(b"")
    (tmp_path / "r18.json").write_text(text)
    with pytest.raises(InputError) as info:
        _sidecar(weights)
    assert str(tmp_path / "r18.json") in info.value.message and fragment in info.value.message
    assert info.value.exit_code == 2


def test_valid_or_absent_sidecar(tmp_path):
    weights = tmp_path / "r18.safetensors"
    assert _sidecar(weights) == {}
    data = {"arch": "resnet18", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [3, 32, 32],
            "license": "mit"}
    (tmp_path / "r18.json").write_text(json.dumps(data))
    assert _sidecar(weights) == data


def test_run_with_malformed_sidecar_exits_2(tmp_path, tiny_teacher_file):
    teacher = tmp_path / "teacher_r18.safetensors"
    shutil.copy(tiny_teacher_file, teacher)
    (tmp_path / "teacher_r18.json").write_text('{"mean": [0.5, 0.5, 0.5], "std": ')
    result = run_cli("run", "--teacher", str(teacher), "--teacher-arch", "resnet18", "--method", "simreg",
                     "--student", "tiny-cnn", "--data", "builtin:digits", "--image-size", "16",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"teacher sidecar {tmp_path / 'teacher_r18.json'} is not readable JSON" in " ".join(result.stderr.split())
