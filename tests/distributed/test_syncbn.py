"""CPU sync BatchNorm under gloo (torch's SyncBatchNorm is CUDA-only): two ranks holding half a batch each
get the outputs, parameter gradients and running statistics of one process holding the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distillctl.launch import strip_nproc, torchrun_command

RANK_SCRIPT = r"""
import copy, json, sys
import torch
import torch.distributed as dist
from distillctl.train.syncbn import GlooSyncBatchNorm, convert_sync_batchnorm

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                          torch.nn.Linear(4 * 4 * 4, 6), torch.nn.BatchNorm1d(6))
x = torch.randn(8, 3, 6, 6) * 3 + 1
weights = torch.randn(8, 6)
reference = copy.deepcopy(net)
reference_out = reference(x)
(reference_out * weights).mean().backward()
convert_sync_batchnorm(net, "cpu")
assert sum(isinstance(m, GlooSyncBatchNorm) for m in net.modules()) == 2
rows = slice(4 * rank, 4 * rank + 4)
out = net(x[rows])
(out * weights[rows]).mean().backward()  # each rank: the mean over its rows; gradients averaged below
for p in net.parameters():
    dist.all_reduce(p.grad)
    p.grad /= 2
report = {"out": float((out - reference_out[rows]).abs().max()),
          "grad": max(float((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12))
                      for p, q in zip(net.parameters(), reference.parameters()) if q.grad.abs().max() > 1e-6),
          "running": max(float((a - b).abs().max()) for a, b in zip(net.buffers(), reference.buffers())),
          "keys": sorted(net.state_dict()) == sorted(reference.state_dict())}
print(json.dumps(report), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_gloo_sync_batchnorm_equals_one_process_batchnorm(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "store")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    for process in ranks:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr[-3000:]
        report = json.loads(stdout.strip().splitlines()[-1])
        assert report["keys"]  # state-dict keys of plain BatchNorm: the student still loads into timm
        assert report["out"] < 1e-5 and report["grad"] < 1e-4 and report["running"] < 1e-5, report


def test_nproc_relaunch_command():
    argv = ["run", "--recipe", "quickstart", "--nproc", "4", "--set", "train.sync_bn=true", "--nproc=2"]
    assert strip_nproc(argv) == ["run", "--recipe", "quickstart", "--set", "train.sync_bn=true"]
    command = torchrun_command(4, argv)
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m"]
    assert command[6:] == ["distillctl", "run", "--recipe", "quickstart", "--set", "train.sync_bn=true"]
