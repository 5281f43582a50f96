"""Example pipelines that are run (issue 17 §4): examples/ci/local.sh executes the steps of the GitHub Actions and
GitLab CI examples on the built-in data; a failed gate fails the script with exit 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest
import yaml

from tests.conftest import REPO

LOCAL = REPO / "examples" / "ci" / "local.sh"
SMALL = ("--set teacher.pretrain.epochs=1 --set train.epochs=1 --set export.calib_size=64 "
         "--set export.parity_images=16")


def test_ci_files_parse_and_run_the_local_script():
    github = yaml.safe_load((REPO / "examples" / "ci" / "github-actions.yml").read_text())
    steps = github["jobs"]["distil"]["steps"]
    assert any("examples/ci/local.sh" in step.get("run", "") for step in steps)
    assert any(step.get("uses", "").startswith("actions/upload-artifact") for step in steps)
    assert sum(step.get("uses", "").startswith("actions/cache") for step in steps) == 2  # venv and teacher
    gitlab = yaml.safe_load((REPO / "examples" / "ci" / "gitlab-ci.yml").read_text())["distil"]
    assert "examples/ci/local.sh" in gitlab["script"] and gitlab["artifacts"]["when"] == "always"
    assert {"DISTILLCTL_HOME"} <= set(gitlab["variables"]) and len(gitlab["cache"]) == 2
    assert os.access(LOCAL, os.X_OK)


def _local(tmp_path, **env):
    full = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "ci-out"),
            "DISTILLCTL": f"{sys.executable} -m distillctl", "EXTRA_SET": SMALL, **env}
    return subprocess.run(["bash", str(LOCAL)], cwd=REPO, env=full, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_local_ci_script_trains_gates_bundles_and_verifies(tmp_path):
    result = _local(tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "ci-out"
    gates = json.loads((out / "gates.json").read_text())
    assert gates["passed"] and gates["checked"] == 4
    assert json.loads((out / "verify.json").read_text())["passed"] is True
    with tarfile.open(out / "release.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"./manifest.json", "./model/student.onnx", "./model/student.int8.onnx", "./samples/reference.npy"} <= names
    assert "gates passed: True (4 checked)" in result.stderr

    failed = _local(tmp_path, MIN_KNN="100")  # same run: nothing retrained, the gate fails the pipeline
    assert failed.returncode == 3, failed.stderr[-3000:]
    assert "min_student_knn" in failed.stderr and "skipped" in failed.stderr
    assert json.loads((out / "summary.json").read_text())["gates"]["failed"] == ["min_student_knn"]
