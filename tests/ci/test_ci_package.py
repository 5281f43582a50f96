"""Installable package (issue 17 §9, issue 12 §3 "the wheel ships no recipes"): `python -m build` gives a wheel
and an sdist without packaging warnings; the wheel, installed into a fresh venv, lists, shows and runs the shipped
recipes from an empty folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO


def _recipes() -> set[str]:
    return {path.name for path in (REPO / "recipes").glob("*.yaml")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path_factory.mktemp("cwd"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (result.stdout + result.stderr).lower()
    assert "deprecat" not in log, [line for line in log.splitlines() if "deprecat" in line]
    return out


@pytest.mark.slow
def test_wheel_and_sdist_carry_recipes_registry_and_indexes(built):
    [wheel] = built.glob("*.whl")
    [sdist] = built.glob("*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"distillctl/recipes/{name}" for name in _recipes()} <= names
    assert {"distillctl/teachers/registry.yaml", "distillctl/method_catalogue.json"} <= names
    protocols = {f"distillctl/recipes/protocols/{path.name}" for path in (REPO / "recipes" / "protocols").glob("*.yaml")}
    assert protocols and protocols <= names  # distillctl protocol list/run work from an installed wheel
    with tarfile.open(sdist) as archive:
        members = {member.name.split("/", 1)[1]: member for member in archive.getmembers() if "/" in member.name}
    assert {f"distillctl/recipes/{name}" for name in _recipes()} <= set(members)
    assert all(members[f"distillctl/recipes/{name}"].isfile() for name in _recipes())  # files, not a dangling link


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_lists_shows_and_runs_recipes_from_an_empty_folder(built, tmp_path):
    [wheel] = built.glob("*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    target = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                          text=True).strip())
    # the cheap trick: the test environment's dependencies (torch, timm, …) on the new venv's path, after its own
    # site-packages, so the wheel's distillctl (not the development checkout) is the one imported
    (target / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, text=True, timeout=600)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**{key: value for key, value in os.environ.items() if key != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    cli = env_dir / "bin" / "distillctl"

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(cli), *args], cwd=empty, env=env, capture_output=True, text=True, timeout=900)

    where = subprocess.run([str(python), "-c", "import distillctl; print(distillctl.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(target)), where
    listed = call("recipes", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["recipes"]
    assert {row["name"] + ".yaml" for row in rows} == _recipes()
    assert all(row["path"].startswith(str(target)) for row in rows)
    shown = call("recipes", "show", "quickstart")
    assert shown.returncode == 0 and "name: quickstart" in shown.stdout
    ran = call("run", "--recipe", "quickstart", "--set", "teacher.pretrain.epochs=1", "--set", "train.epochs=1",
               "--json")
    assert ran.returncode == 0, ran.stderr[-3000:]
    summary = json.loads(ran.stdout)
    assert summary["export"]["onnx"]["parity"]["passed"] and (empty / "runs" / "quickstart" / "summary.json").is_file()
