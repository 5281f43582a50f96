"""Every command leaves its process group before the interpreter exits: gloo's worker threads left to
interpreter shutdown can abort a worker whose run succeeded (SIGABRT, "terminate called without an active
exception"; pytorch/pytorch#190489), and torchrun then reports the whole run as failed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import sys, tempfile, os
    import torch.distributed as dist
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    from distillctl.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    print("initialised after:", dist.is_initialized(), "exit:", code)
""")


def _after(*args: str) -> str:
    result = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_a_successful_command_leaves_the_process_group():
    assert _after("methods", "list") == "initialised after: False exit: 0"


def test_a_failing_command_leaves_the_process_group_and_keeps_its_exit_code():
    assert _after("methods", "show", "no-such-method") == "initialised after: False exit: 2"
