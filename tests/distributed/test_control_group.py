"""Host-side control collectives (stop votes, bad-image counts, log-step means, pickled objects) travel in a
gloo group when the default group is NCCL, so the per-step vote of the training loop neither copies to the GPU
nor waits for the step's queued kernels. Checked here in a one-process gloo world, with the control group opened
as init_from_env opens it under NCCL."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import json, os, tempfile
    import torch.distributed as dist
    from distillctl.train import distributed as D
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    before = D._control()[0] is None
    seen = []
    real = dist.all_reduce
    def spy(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        seen.append({"device": str(tensor.device), "control": group is not None and group is D._CONTROL_GROUP})
        return real(tensor, op=op, group=group, async_op=async_op)
    dist.all_reduce = spy
    D.open_control_group()
    out = {"default_only_before": before,
           "sum": D.all_reduce_sum([1.0, 0.0, 3.0]),
           "gathered": D.all_gather_object({"a": 1}),
           "broadcast": D.broadcast_object("x"),
           "calls": seen}
    D.destroy()
    out["after"] = [dist.is_initialized(), D._CONTROL_GROUP is None]
    print(json.dumps(out))
""")


def test_control_values_use_the_gloo_control_group_on_the_cpu():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["default_only_before"] is True
    assert out["sum"] == [1.0, 0.0, 3.0] and out["gathered"] == [{"a": 1}] and out["broadcast"] == "x"
    assert out["calls"] == [{"device": "cpu", "control": True}]
    assert out["after"] == [False, True]
