"""``distillctl cache ...`` end to end: build from a local teacher file, knn/kmeans artefacts, disk-space refusal,
and a real ``kill -9`` of ``python -m distillctl cache build`` followed by a rerun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cache_helpers import make_teacher
from distillctl.cache import FeatureCache
from distillctl.cli import main


def _cli(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture
def teacher_file(tmp_path, monkeypatch) -> Path:
    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in make_teacher().backbone.state_dict().items()}, weights)
    monkeypatch.setenv("DISTILLCTL_HOME", str(tmp_path / "home"))
    return weights


def _build_args(weights: Path, data: str, out: Path, *extra: str) -> list[str]:
    return ["cache", "build", "--teacher", str(weights), "--teacher-arch", "test_resnet", "--teacher-format", "plain",
            "--data", data, "--out", str(out), *extra]


def test_cli_build_info_knn_kmeans(teacher_file, image_folder, tmp_path, capsys):
    out = tmp_path / "cache"
    code = _cli(_build_args(teacher_file, image_folder.root, out, "--views", "3", "--image-size", "24",
                            "--family", "mocov2", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2", "--json"))
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] and info["views"] == 3 and info["outputs"] == {"pooled": 96}
    assert info["transform"]["spec"]["family"] == "mocov2" and info["transform"]["mean"] == [0.5, 0.5, 0.5]
    assert info["dataset"]["num_images"] == 40 and info["transform"]["decoder"].startswith("PIL")
    files = (out / "index" / "files.txt").read_text().split()
    assert files[0] == "class0/img00.png" and len(files) == 40
    cache = FeatureCache.open(out, verify=True)
    assert cache.manifest["teacher"]["sha256"] == info["teacher"]["sha256"] != "ab" * 32  # the converted file's hash

    assert _cli(["cache", "knn", str(out), "--k", "4", "--json"]) == 0
    knn = json.loads(capsys.readouterr().out)
    bags = np.load(knn["path"])
    assert bags.shape == (40, 4) and not (bags == np.arange(40)[:, None]).any()
    assert _cli(["cache", "kmeans", str(out), "--clusters", "4", "--iters", "5", "--json"]) == 0
    kmeans = json.loads(capsys.readouterr().out)
    assert np.load(kmeans["path"]).shape == (40,) and kmeans["clusters"] == 4

    assert _cli(["cache", "verify", str(out)]) == 0
    assert _cli(["cache", "verify", str(out), "--teacher", str(teacher_file), "--teacher-arch", "test_resnet",
                 "--teacher-format", "plain", "--data", image_folder.root, "--samples", "12", "--json"]) == 0
    drift = json.loads(capsys.readouterr().out)["spot_check"]
    assert drift["samples"] == 12 and drift["min_cosine"]["pooled"] > 0.999
    assert _cli(["cache", "info", str(tmp_path / "missing")]) == 2
    assert _cli(_build_args(teacher_file, image_folder.root, out, "--views", "2", "--image-size", "24")) == 3  # K differs
    assert "views K=3 (cache) vs 2 (run)" in capsys.readouterr().err.replace("\n", " ")


def test_cli_disk_space_check_exits_2_and_writes_nothing(teacher_file, image_folder, tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "new" / "cache"
    assert _cli(_build_args(teacher_file, image_folder.root, out, "--views", "4", "--image-size", "24")) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "not enough disk space" in err and "40 images x 4 views" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_kill_9_of_the_cli_then_rerun_finishes_the_same_cache(teacher_file, tmp_path):
    """Killed once its first shard is sealed; rerunning the same command resumes and matches a clean build."""
    args = ["--data", "builtin:digits", "--views", "2", "--image-size", "32", "--batch-size", "16",
            "--shard-size", "100", "--family", "weak", "--no-progress"]
    base = ["cache", "build", "--teacher", str(teacher_file), "--teacher-arch", "test_resnet", "--teacher-format", "plain"]
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "distillctl", *base, *args, "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    first_seal = out / "done" / "shard_00000.seal.json"
    deadline = time.monotonic() + 120
    while not first_seal.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["dataset"]["num_images"] == 1437

    rerun = subprocess.run([sys.executable, "-m", "distillctl", *base, *args, "--out", str(out), "--json"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    info = json.loads(rerun.stdout)
    assert info["complete"] and 0 < info["build"]["images_built"] < 1437

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses ran single-threaded: same kernels, same bits
    try:
        assert _cli([*base, *args, "--out", str(tmp_path / "reference")]) == 0
    finally:
        torch.set_num_threads(threads)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for sub in ("params", "pooled") for p in (root / sub).glob("*.npy")}

    assert files(out) == files(tmp_path / "reference") and len(files(out)) == 2 * 15


def test_a_cache_another_process_is_building_is_refused_then_built_when_it_is_free(teacher_file, image_folder,
                                                                                  tmp_path, capsys):
    """One builder per cache directory: while another process holds ``<cache>/.lock`` (a run or ``cache build``
    writing its shards), a second build exits 2 with one line naming it and writes nothing; once the holder is gone
    (here: killed, as ``kill -9`` would), the same command builds the cache."""
    out = tmp_path / "cache"
    hold = ("import sys, time; from distillctl.runlock import acquire; acquire(sys.argv[1], 'cache build'); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        args = _build_args(teacher_file, image_folder.root, out, "--views", "2", "--image-size", "24")
        assert _cli(args) == 2
        err = capsys.readouterr().err
        assert f"feature cache {out} is in use by pid {holder.pid} " in err and "wait for it or stop it" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert _cli(args) == 0
    assert FeatureCache.open(out, verify=True).manifest["complete"]


def test_cli_builds_a_cache_with_rotations_and_info_says_so(teacher_file, image_folder, tmp_path, capsys):
    """`cache build --rotations 4` (dlkd's cache): K crops x 4 rotations per image; out-of-range is exit 2."""
    out = tmp_path / "rotated"
    assert _cli(_build_args(teacher_file, image_folder.root, out, "--views", "2", "--rotations", "4",
                            "--image-size", "24", "--json")) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] and (info["views"], info["turns"]) == (8, 4)
    assert _cli(["cache", "info", str(out)]) == 0
    # the table wraps long cells at the terminal's width (a long tmp path widens the first column): read it with
    # the borders removed so a wrapped cell reads as one line
    shown = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert "views (K) 2 (view 0 = centre crop" in shown, shown
    assert "rotations 4: each view also stored at 1..3 quarter turns (8 rows per image)" in shown, shown
    assert _cli(_build_args(teacher_file, image_folder.root, tmp_path / "bad", "--rotations", "5")) == 2
    assert not (tmp_path / "bad").exists()
