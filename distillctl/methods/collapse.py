"""Representation-collapse watch: warn when a student's embeddings of different images point one way.

Contrastive and self-distillation objectives have a degenerate solution in which the projection maps every image to
(nearly) the same unit vector. Once there, the loss gives almost no gradient (every logit is equal: a queue loss
sits at ln(K+1)) and the run goes on for hours without learning. On this repository's CIFAR-10 protocol that is
what MoCo-style queue contrast (``mocov2``, ``rekd``) does to a MobileNetV2 student: the loss sits at ln(K+1) from
the first hundred steps on, and the queued keys of different images end with a mean cosine of 0.99
(benchmarks/RESULTS.md, "What moves the weak methods"). SMD ends in the teacher-target form of it: every
student embedding on the teacher's mean direction (mean pairwise cosine 0.997 at the end of the 120,000-image cell,
RESULTS.md's embedding-geometry table); a pure cosine term in SMD's recipe ends there too at 30,000 images, so the
recipe, not only the hard-aware term, holds it.

Methods that have an L2-normalised student embedding report ``embedding_cos`` in their step logs: the mean cosine
similarity between the embeddings of *different* images in the batch (:func:`embedding_cosine`). The training loop
feeds every logged row to :class:`CollapseWatch`, which warns once when the value stays at or above
:data:`COLLAPSE_COSINE` for :data:`CONSECUTIVE_ROWS` log rows, and records the first such step in the run summary
(``train.collapse``), where CI and the benchmarks read it. It is a diagnosis, not a stop: collapse can be left
again (the loss then falls; the watch then records ``recovered_at_step``), and the run's own evaluation decides what
the student is worth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG_KEY = "embedding_cos"
COLLAPSE_COSINE = 0.95  # healthy contrastive embeddings sit far below (random init ≈ 0.7, trained ≈ 0–0.5)
CONSECUTIVE_ROWS = 2  # one noisy row is not a collapse


@torch.no_grad()
def embedding_cosine(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the rows of ``embeddings`` (B, D), over the B·(B−1) pairs i ≠ j.

    A 0-d tensor on the input's device (read only at log steps, so no host sync per step). B < 2 gives NaN, which
    the watch ignores."""
    rows = F.normalize(embeddings.detach().float(), dim=1)
    count = rows.shape[0]
    if count < 2:
        return torch.full((), float("nan"), device=embeddings.device)
    total = rows.sum(dim=0)
    # Σ_{i≠j} z_i·z_j = |Σ z|² − Σ |z_i|², so no B×B matrix is formed
    off_diagonal = total.dot(total) - (rows * rows).sum()
    return off_diagonal / (count * (count - 1))


@dataclass
class Collapse:
    """The first log step at which the watch judged the embeddings collapsed, whether (and when) they left the
    collapse again, and the last logged value (the state the run ended in)."""

    step: int
    embedding_cos: float
    recovered_step: int | None = None  # first step of CONSECUTIVE_ROWS rows below the threshold after ``step``
    last_cos: float | None = None

    def to_dict(self) -> dict:
        last = self.embedding_cos if self.last_cos is None else self.last_cos
        return {"step": self.step, "embedding_cos": round(self.embedding_cos, 4), "threshold": COLLAPSE_COSINE,
                "recovered_at_step": self.recovered_step, "last_embedding_cos": round(last, 4)}

    def message(self, stage: str) -> str:
        return (f"{stage}: the student's embeddings have collapsed: different images have mean cosine "
                f"{self.embedding_cos:.3f} (≥ {COLLAPSE_COSINE}) at step {self.step}, so the loss carries almost no "
                "signal; a lower lr, a distillation method with a fixed teacher target (e.g. compress-1q) or a "
                "larger student usually avoid it (see `distillctl methods show` for the method's notes)")

    def recovery_message(self, stage: str) -> str:
        return (f"{stage}: the student's embeddings left the collapse: mean cosine {self.last_cos:.3f} "
                f"(< {COLLAPSE_COSINE}) from step {self.recovered_step} on")


class CollapseWatch:
    """Feed it each logged row's ``embedding_cos``. :meth:`observe` returns the collapse once, when first found;
    afterwards it follows the value, so ``found`` also says whether the run left the collapse (``recovered_step``,
    cleared again if it falls back) and where it ended (``last_cos``). ``recovered_now`` is True on the one
    observation at which a recovery is first seen (the loop logs it)."""

    def __init__(self) -> None:
        self.found: Collapse | None = None
        self._run = 0  # consecutive rows at or above the threshold
        self._below = 0  # consecutive rows below it
        self.recovered_now = False

    def observe(self, step: int, logs: dict[str, float]) -> Collapse | None:
        self.recovered_now = False
        value = logs.get(LOG_KEY)
        if value is None or value != value:  # not reported by this method, or NaN
            return None
        high = value >= COLLAPSE_COSINE
        self._run = self._run + 1 if high else 0
        self._below = 0 if high else self._below + 1
        if self.found is None:
            if self._run >= CONSECUTIVE_ROWS:
                self.found = Collapse(step, float(value), last_cos=float(value))
                return self.found
            return None
        self.found.last_cos = float(value)
        if self.found.recovered_step is None and self._below >= CONSECUTIVE_ROWS:
            self.found.recovered_step = step
            self.recovered_now = True
        elif self.found.recovered_step is not None and self._run >= CONSECUTIVE_ROWS:
            self.found.recovered_step = None  # collapsed again: the run is judged by where it ends
        return None

    def state_dict(self) -> dict:
        """Checkpointed with the run, so a resumed run reports what the uninterrupted one would."""
        found = self.found
        return {"run": self._run, "below": self._below,
                "found": None if found is None else [found.step, found.embedding_cos, found.recovered_step,
                                                     found.last_cos]}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}  # checkpoints written before the watch existed
        self._run = int(state.get("run", 0))
        self._below = int(state.get("below", 0))
        found = state.get("found")
        if found is None:
            self.found = None
        else:  # [step, cos] before recovery was tracked
            recovered = found[2] if len(found) > 2 else None
            last = found[3] if len(found) > 3 else None
            self.found = Collapse(int(found[0]), float(found[1]), None if recovered is None else int(recovered),
                                  None if last is None else float(last))
