"""A real ``kill -9`` in the middle of a shard, then a resume in a fresh process: the store is byte-identical
to an uninterrupted build. (The CLI variant is in test_cache_cli.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_helpers import MEAN, STD, make_teacher
from distillctl.cache import build_cache
from distillctl.data.views import ViewSpec

TESTS_DIR = Path(__file__).resolve().parent
SPEC = ViewSpec(size=24, family="simclr")

BUILD_SCRIPT = """
import sys, time
import torch
sys.path.insert(0, {tests!r})
from cache_helpers import MEAN, STD, make_teacher
from distillctl.cache import build_cache
from distillctl.data.datasets import open_dataset
from distillctl.data.views import ViewSpec

torch.set_num_threads(1)
pause = float(sys.argv[3])

def hook(info):
    print(f"batch shard={{info.shard}} done={{info.images_done}}", flush=True)
    time.sleep(pause)

build_cache(make_teacher(), open_dataset(sys.argv[1]), sys.argv[2], spec=ViewSpec(size=24, family="simclr"), views=3,
            outputs={{"pooled", "proj"}}, mean=MEAN, std=STD, batch_size=6, shard_size=16, progress=False,
            on_batch=hook, flush_seconds=0.0)
print("finished", flush=True)
"""


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for sub in ("params", "pooled", "proj") if (root / sub).is_dir() for p in sorted((root / sub).glob("*.npy"))}


def _single_thread_build(*args, **kwargs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run single-threaded too: same kernels, same bits
    try:
        return build_cache(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_kill_9_mid_shard_then_resume_is_identical(image_folder, tmp_path):
    script = tmp_path / "build.py"
    script.write_text(BUILD_SCRIPT.format(tests=str(TESTS_DIR)))
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(script), image_folder.root, str(out), "0.15"],
                               stdout=subprocess.PIPE, text=True, env=_env())
    lines = []
    for line in process.stdout:  # 20 batches of 2 images; shards of 16 images = 8 batches
        lines.append(line)
        if len(lines) == 11:
            os.kill(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    assert (out / "done" / "shard_00000.seal.json").is_file()
    assert not (out / "done" / "shard_00001.seal.json").exists()
    done = np.unpackbits(np.fromfile(out / "done" / "shard_00001.bits", dtype=np.uint8), count=16)
    assert 4 <= done.sum() < 16  # the resume really continues a partial shard from its bitmap

    resumed = subprocess.run([sys.executable, str(script), image_folder.root, str(out), "0"], capture_output=True,
                             text=True, env=_env(), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    batches = [line for line in resumed.stdout.splitlines() if line.startswith("batch")]
    assert 0 < len(batches) < 20

    reference = tmp_path / "reference"
    _single_thread_build(make_teacher(), image_folder, reference, spec=SPEC, views=3, outputs={"pooled", "proj"},
                         mean=MEAN, std=STD, batch_size=6, shard_size=16, progress=False)
    assert _files(out) == _files(reference) and len(_files(out)) == 9
    final = json.loads((out / "manifest.json").read_text())
    assert final["complete"] and final["shards"] == json.loads((reference / "manifest.json").read_text())["shards"]
