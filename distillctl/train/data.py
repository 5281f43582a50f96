"""Training data: per-sample views from keyed randomness (or replayed from the feature cache), and a
deterministic, resumable, rank-sharded batch order.

The global batch order of epoch e is a permutation keyed by (seed, e); rank r of W takes rows
[r·B/W, (r+1)·B/W) of every global batch, so the global batch is the same whatever the world size and a
resumed run continues at the exact batch where it stopped.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from distillctl.data.bad_images import load_or_substitute
from distillctl.data.datasets import ImageDataset
from distillctl.data.views import NEIGHBOUR_SLOT, draw_neighbour  # noqa: F401  (re-exported)
from distillctl.data.views import ViewSpec, apply_view_uint8, sample_rng, sample_view
from distillctl.errors import InputError


def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.Generator(np.random.Philox(key=[seed & 0xFFFFFFFFFFFFFFFF, (epoch + 1) << 20]))
    return rng.permutation(num_items)


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This rank's share of each global batch of one epoch, from ``start_step`` on (drop_last)."""

    def __init__(self, num_items: int, global_batch: int, seed: int, epoch: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise InputError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.order = epoch_permutation(num_items, seed, epoch)
        self.global_batch = global_batch
        self.per_rank = global_batch // world_size
        self.rank = rank
        self.start_step = start_step
        self.steps = num_items // global_batch

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            batch = self.order[step * self.global_batch:(step + 1) * self.global_batch]
            yield batch[self.rank * self.per_rank:(self.rank + 1) * self.per_rank].tolist()


class DecodedImages:
    """Each training image decoded once per process: its uint8 pixels are kept (up to ``budget_bytes``) and every
    later epoch replays its views from them instead of decoding the file again.

    Profiled (benchmarks/RESULTS.md, speed section): JPEG decoding was 8-10 % of a cached distillation step's CPU
    time at 64 px. Pixels are what the decoder returns, so views, and exact resume, are unchanged; a resumed run
    simply decodes again. Images that needed a substitute (unreadable files) are not kept, so every epoch reports
    them as before. Only for a loader without worker processes (workers would each fill a copy per epoch).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.pixels: dict[int, torch.Tensor] = {}

    def load_or_substitute(self, base: ImageDataset, index: int):
        kept = self.pixels.get(index)
        if kept is not None:
            return index, kept, []
        loaded, image, bad = load_or_substitute(base, index)
        if image is not None and loaded == index and not bad and self.used + image.numel() <= self.budget:
            self.pixels[index] = image
            self.used += image.numel()
        return loaded, image, bad


class ViewDataset(torch.utils.data.Dataset):
    """Item ``i`` → (uint8 views per slot, label, index, stored-view id per slot (−1 = live sample)).

    ``teacher_slots`` are the view slots whose teacher targets come from ``cache`` (cached mode): those
    views are replayed from the cache's stored parameters instead of being sampled.
    """

    def __init__(self, base: ImageDataset, specs: Sequence[ViewSpec], seed: int, epoch: int = 0,
                 cache=None, cached_slots: Sequence[int] = (),
                 neighbour_slots: Sequence[int] = (), bags=None, decoded: DecodedImages | None = None) -> None:
        self.base = base
        self.decoded = decoded
        self.specs = list(specs)
        self.seed = seed
        self.epoch = epoch
        self.cache = cache
        self.cached_slots = list(cached_slots)
        self.neighbour_slots = set(neighbour_slots)
        self.bags = bags
        if self.neighbour_slots and bags is None:
            raise ValueError("neighbour views need a kNN bag table")

    def __len__(self) -> int:
        return len(self.base)

    def stored_views(self, index: int) -> dict[int, int]:
        """Which stored row each cached slot replays this epoch: distinct crops when K allows, each at the
        slot's rotation (a cache with rotations stores crop k at quarter turn t in row k·turns + t)."""
        rng = sample_rng(self.seed, self.epoch, index, 1 << 16)
        turns = self.cache.turns
        total = self.cache.views // turns
        picks = rng.permutation(total)[: len(self.cached_slots)] if len(self.cached_slots) <= total else \
            rng.integers(0, total, size=len(self.cached_slots))
        return {slot: int(k) * turns + self.specs[slot].quarter_turns for slot, k in zip(self.cached_slots, picks)}

    def _load_or_substitute(self, index: int) -> tuple[int, torch.Tensor | None, list[tuple[str, str]]]:
        """Decode image ``index``; if it is unreadable, a keyed substitute (index + k·7919 mod N).

        Substituting keeps every rank's batch the same size, so collectives inside methods (all-gathers
        of keys, queues) never see ragged batches, and the choice is deterministic for exact resume.
        """
        if self.decoded is not None:
            return self.decoded.load_or_substitute(self.base, index)
        return load_or_substitute(self.base, index)  # the policy shared with the cache build

    def __getitem__(self, index: int):
        index, image, bad = self._load_or_substitute(index)
        if image is None:
            return None, index, bad
        images = {index: image}
        neighbour = index
        if self.neighbour_slots:  # BINGO-style views of a teacher-kNN neighbour j of this sample
            neighbour, neighbour_image, neighbour_bad = self._load_or_substitute(
                draw_neighbour(self.bags, index, self.seed, self.epoch))
            bad += neighbour_bad
            if neighbour_image is None:
                return None, index, bad
            images[neighbour] = neighbour_image
        stored = {i: self.stored_views(i) for i in images} if self.cache is not None and self.cached_slots else {}
        views, ks, sources = [], [], []
        for slot, spec in enumerate(self.specs):
            source = neighbour if slot in self.neighbour_slots else index
            pixels = images[source]
            if slot in stored.get(source, {}):
                params = self.cache.view_params(source, stored[source][slot])
                ks.append(stored[source][slot])
            else:
                # keyed by the sample (not the neighbour), so every (sample, slot) has its own view stream
                params = sample_view(spec, pixels.shape[-2], pixels.shape[-1], sample_rng(self.seed, self.epoch, index, slot))
                ks.append(-1)
            sources.append(source)
            views.append(apply_view_uint8(pixels, params, spec))
        return (views, self.base.labels[index], index, torch.tensor(ks, dtype=torch.long),
                torch.tensor(sources, dtype=torch.long), bad)


def collate_views(items):
    """Stack each view slot; return the unreadable files met (path, reason). ``None`` batch: nothing
    of an item (nor its substitutes) could be read."""
    bad = [entry for item in items for entry in item[-1]]
    if any(item[0] is None for item in items):
        return None, bad
    num_views = len(items[0][0])
    views = [torch.stack([item[0][v] for item in items]) for v in range(num_views)]
    labels = torch.tensor([item[1] for item in items], dtype=torch.long)
    index = torch.tensor([item[2] for item in items], dtype=torch.long)
    stored = torch.stack([item[3] for item in items])
    sources = torch.stack([item[4] for item in items])
    return (views, labels, index, stored, sources), bad
