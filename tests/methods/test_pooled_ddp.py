"""DDP state updates of ProtoCPC (prior EMA) and ProtoSEED (k-means prototypes) with two real gloo processes on CPU:
each rank sees a different half of the batch, and after ``after_step`` both ranks hold the same state, equal to one
process updating on the whole batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distillctl.methods.base import MethodInputs, TeacherDims
from distillctl.methods.protocpc import ProtoCPC, ProtoCPCParams
from distillctl.methods.protoseed import ProtoSEED, ProtoSEEDParams

DIMS = TeacherDims(pooled=12, proj=6)


def _methods() -> tuple[ProtoCPC, ProtoSEED]:
    torch.manual_seed(0)  # identical heads and prototypes on every rank, as the trainer's seeded build gives
    return (ProtoCPC(ProtoCPCParams(out_dim=7, hidden_dim=8), 5, DIMS),
            ProtoSEED(ProtoSEEDParams(num_prototypes=4), 5, DIMS))


def _batch(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(42)
    students, teachers = torch.randn(8, 5, generator=generator), torch.randn(8, 6, generator=generator)
    return students[rows], teachers[rows]


def _step(methods, rows: slice) -> dict[str, torch.Tensor]:
    students, teachers = _batch(rows)
    for method in methods:
        inputs = MethodInputs(student_features=[students], teacher_outputs=[{"proj": teachers}], images=[],
                              index=torch.arange(students.shape[0]), epoch=0.0, step=0, total_epochs=1)
        method.loss(inputs)
        method.after_step(inputs)
    return {"prior": methods[0].prior.clone(), "prototypes": methods[1].prototypes.clone()}


def _worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        state = _step(_methods(), slice(4 * rank, 4 * rank + 4))
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~40 s on one core
def test_prior_and_prototypes_agree_across_ranks_and_with_one_process(tmp_path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _step(_methods(), slice(0, 8))
    for key in ("prior", "prototypes"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.allclose(ranks[0][key], single[key], atol=1e-6), key
    assert not torch.equal(single["prior"], torch.ones(7))  # the step really moved the prior
