"""DDP behaviour of the shared pieces with two real gloo processes on CPU: shuffle-BN restores each rank's
order, every rank enqueues the same all-gathered keys, and the step-keyed permutation is identical across ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distillctl.methods.common import FeatureQueue
from distillctl.methods.shared import shuffled_forward


class RecordingEncoder(torch.nn.Module):
    """Doubles its input and remembers which rows it saw (to check the cross-rank shuffle)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.clone()
        return 2 * x


def _worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        local = torch.arange(4, dtype=torch.float32).unsqueeze(1) + 10 * rank  # rank 0: 0..3, rank 1: 10..13
        encoder = RecordingEncoder()
        restored = shuffled_forward(encoder, local, step=3)
        queue = FeatureQueue(6, 1, init="zeros")
        queue.enqueue(restored)
        torch.save({"restored": restored, "seen": encoder.seen, "queue": queue.data.clone(), "ptr": int(queue.ptr)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_shuffle_bn_and_queue_across_two_ranks(tmp_path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank, result in enumerate(results):
        expected_local = torch.arange(4, dtype=torch.float32).unsqueeze(1) + 10 * rank
        assert torch.equal(result["restored"], 2 * expected_local)  # outputs back in this rank's order
    seen = torch.cat([r["seen"] for r in results]).flatten().tolist()
    assert sorted(seen) == [0, 1, 2, 3, 10, 11, 12, 13]  # every sample encoded exactly once
    assert sorted(results[0]["seen"].flatten().tolist()) != [0, 1, 2, 3]  # the batch really was mixed across ranks
    # all-gather before enqueue: both ranks hold the same 6-row queue (8 gathered keys → the last 6)
    assert torch.equal(results[0]["queue"], results[1]["queue"]) and results[0]["ptr"] == results[1]["ptr"] == 0
    assert results[0]["queue"].flatten().tolist() == [4, 6, 20, 22, 24, 26]
