"""``distillctl run ... --nproc N``: re-launch the same command under PyTorch's own launcher.

This is a convenience for one machine: it runs ``python -m torch.distributed.run --standalone
--nproc_per_node N -m distillctl <the same arguments without --nproc>`` and returns its exit code, so
the elastic agent (rendezvous, signal forwarding, tearing down every rank when one fails) is torchrun's,
not a home-made launcher. Multi-node jobs call torchrun directly (see the README).
"""

from __future__ import annotations

import os
import subprocess
import sys

from distillctl.errors import UsageError


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the relaunched processes must not relaunch)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line that runs ``distillctl argv`` on ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "distillctl", *strip_nproc(argv)]


def relaunch(nproc: int, argv: list[str] | None = None) -> int:
    """Run this command under torchrun with ``nproc`` processes; returns the exit code.

    SIGTERM/SIGINT sent to this process are forwarded to torchrun, which forwards them to every worker
    (each finishes its step, rank 0 writes the checkpoint, all exit 4). torchrun itself reports any
    worker failure as exit 1, so after a forwarded signal a non-zero exit is reported as 4 (preempted).
    """
    import signal

    from distillctl.errors import EXIT_PREEMPTED

    if nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {nproc}")
    if os.environ.get("LOCAL_RANK") is not None or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UsageError("--nproc cannot be used inside torchrun (this process is already one of its workers)",
                         hint="drop --nproc, or run distillctl without torchrun")
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    child = subprocess.Popen(torchrun_command(nproc, argv), env=env)
    received: list[int] = []

    def forward(signum, frame) -> None:  # noqa: ANN001
        received.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received and code != 0:
        return EXIT_PREEMPTED
    return code
