"""Per-sample method state: a table indexed by dataset index (pseudo-labels, prototype assignments, memory banks).

Every rank holds the whole table and the same values: an update all-gathers (index, value) pairs across ranks
before writing, so after ``after_step`` the tables agree. The table is a buffer of the method, so it is
checkpointed and restored with ``method.state_dict()`` and resumes exactly. Indices within one global batch
are distinct (the batch sampler draws a permutation), so the gathered writes never collide.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from distillctl._infra import all_gather_concat


class SampleState(nn.Module):
    """``values`` (N × *shape) plus ``written`` (N,) flags saying which rows were ever updated."""

    def __init__(self, num_samples: int | None, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32,
                 fill: float | int = 0) -> None:
        super().__init__()
        if num_samples is None or num_samples <= 0:
            raise ValueError("SampleState needs the training-set size (create it in setup() from self.num_samples)")
        self.register_buffer("values", torch.full((num_samples, *shape), fill, dtype=dtype))
        self.register_buffer("written", torch.zeros(num_samples, dtype=torch.bool))

    @property
    def num_samples(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.values[index.to(self.values.device)]

    @torch.no_grad()
    def update(self, index: torch.Tensor, value: torch.Tensor, gather: bool = True) -> None:
        """Write ``value[i]`` to row ``index[i]`` on every rank (all-gathered first unless ``gather=False``)."""
        index = index.to(self.values.device, torch.long)
        value = value.detach().to(self.values.device, self.values.dtype)
        if gather:
            index, value = all_gather_concat(index), all_gather_concat(value)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise IndexError(f"sample index out of range 0..{self.num_samples - 1}")
        self.values[index] = value
        self.written[index] = True

    def coverage(self) -> float:
        """Fraction of rows written at least once."""
        return int(self.written.sum()) / self.num_samples
