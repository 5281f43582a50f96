"""How many intra-op threads a training process uses, so that processes sharing a machine do not oversubscribe it.

PyTorch's default is one intra-op thread per core of the machine in every process. Two runs started at once on a
2-core machine then run four busy threads on two cores, and each step waits on the slowest thread of the
other process: measured, two quickstarts started together took about 25 minutes of wall time each (about 2
alone), while one intra-op thread per process beside another busy job took 3.5 minutes.

Choice, first that applies: ``train.threads`` (``--threads``); ``OMP_NUM_THREADS`` when set (the user or the
scheduler already decided); otherwise the cores this process may run on (``os.sched_getaffinity``, which
honours taskset/cgroup cpusets) divided by the processes of this node (``LOCAL_WORLD_SIZE`` under torchrun),
less one core per data-loader worker process (workers decode and crop on their own cores), at least 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    source: str  # "train.threads" | "OMP_NUM_THREADS" | "auto"
    cores: int  # cores available to this process
    local_world: int  # training processes on this node
    loader_workers: int

    def describe(self) -> str:
        why = {"train.threads": "train.threads", "OMP_NUM_THREADS": "OMP_NUM_THREADS",
               "auto": f"{self.cores} cores / {self.local_world} process(es) on this node"
                       + (f" - {self.loader_workers} loader worker(s)" if self.loader_workers else "")}[self.source]
        return f"{self.threads} intra-op thread(s) ({why})"

    def to_dict(self) -> dict:
        return {"threads": self.threads, "source": self.source, "cores": self.cores,
                "local_world_size": self.local_world, "loader_workers": self.loader_workers}


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _env_int(name: str) -> int | None:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return None
    return value if value >= 1 else None


def choose_threads(requested: int | None, loader_workers: int = 0) -> ThreadChoice:
    """The intra-op thread count for this process (see the module docstring for the order of rules)."""
    cores = available_cores()
    local_world = _env_int("LOCAL_WORLD_SIZE") or 1
    if requested:
        return ThreadChoice(int(requested), "train.threads", cores, local_world, loader_workers)
    from_env = _env_int("OMP_NUM_THREADS")
    if from_env:
        return ThreadChoice(from_env, "OMP_NUM_THREADS", cores, local_world, loader_workers)
    share = cores // local_world - loader_workers
    return ThreadChoice(max(1, share), "auto", cores, local_world, loader_workers)


def apply_threads(requested: int | None, loader_workers: int = 0) -> ThreadChoice:
    """Choose and set ``torch.set_num_threads``; returns the choice (recorded in summary.json)."""
    choice = choose_threads(requested, loader_workers)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice
