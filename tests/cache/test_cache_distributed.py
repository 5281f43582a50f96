"""Two gloo ranks split the shards (rank r builds r, r+W, ...) and produce the same store as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cache_helpers import MEAN, STD, make_teacher
from distillctl.cache import build_cache
from distillctl.data.views import ViewSpec

TESTS_DIR = Path(__file__).resolve().parent

RANK_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from cache_helpers import MEAN, STD, make_teacher
from distillctl.cache import build_cache
from distillctl.data.datasets import open_dataset
from distillctl.data.views import ViewSpec

torch.set_num_threads(1)
rank = int(sys.argv[3])
dist.init_process_group("gloo", init_method="file://" + sys.argv[4], rank=rank, world_size=2)
built = []
cache = build_cache(make_teacher(), open_dataset(sys.argv[1]), sys.argv[2], spec=ViewSpec(size=24, family="weak"),
                    views=2, outputs={{"pooled"}}, mean=MEAN, std=STD, batch_size=8, shard_size=8, progress=False,
                    on_batch=lambda info: built.append(info.shard))
print(json.dumps({{"rank": rank, "shards": sorted(set(built)), "complete": cache.is_complete()}}), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_split_shards_and_match_a_single_process_build(image_folder, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(tests=str(TESTS_DIR)))
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    store = tmp_path / "store"
    ranks = [subprocess.Popen([sys.executable, str(script), image_folder.root, str(out), str(rank), str(store)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    results = []
    for process in ranks:
        stdout, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    # 40 images / 8 per shard = 5 shards: rank 0 builds 0, 2, 4 and rank 1 builds 1, 3
    assert results[0]["shards"] == [0, 2, 4] and results[1]["shards"] == [1, 3]
    assert results[0]["complete"] and results[1]["complete"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_cache(make_teacher(), image_folder, tmp_path / "single", spec=ViewSpec(size=24, family="weak"), views=2,
                    outputs={"pooled"}, mean=MEAN, std=STD, batch_size=8, shard_size=8, progress=False)
    finally:
        torch.set_num_threads(threads)
    for sub in ("params", "pooled"):
        for path in sorted((tmp_path / "single" / sub).glob("*.npy")):
            assert (out / sub / path.name).read_bytes() == path.read_bytes()
    distributed = json.loads((out / "manifest.json").read_text())
    single = json.loads((tmp_path / "single" / "manifest.json").read_text())
    assert distributed["complete"] and distributed["build"]["world_size"] == 2
    assert distributed["build"]["images_built"] == 40  # summed over both ranks
    assert distributed["shards"] == single["shards"] and distributed["fingerprint"] == single["fingerprint"]
