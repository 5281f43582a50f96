"""Pieces shared by the catalogue-I methods (SMD, DisCo, BINGO, CompRess, SEED/SimReg variants, BYOL, DINO).

``common.py`` holds the queue, EMA, MLP builders and InfoNCE; this module adds what several of the
newer methods need on top of them: choosing the teacher target, similarity-distribution KL,
CutMix with area correction, kNN bags, neighbour views, shuffle-BN for momentum encoders,
deterministic per-step randomness and multi-crop sizing. Each is written once and reused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distillctl.errors import UsageError
from distillctl.data.views import ViewSpec
from distillctl.methods.base import MethodParams, MethodView, TeacherDims
from distillctl.methods.domains import CropScale
from distillctl.methods.mocov2 import _Encoder as BackboneWithHead  # noqa: F401  (re-exported)
from distillctl._infra import all_gather_concat, info, is_distributed

TeacherFeature = Literal["auto", "backbone", "projection"]


class CropParams(MethodParams):
    """The random-resized-crop knobs every augmented method exposes (as mocov2/seed/simreg do)."""

    crop_scale: CropScale = (0.2, 1.0)  # RandomResizedCrop area range
    flip: bool = True  # horizontal flips (turn off for digits/text)


def crop_view(params: CropParams, size: int, family: str, scale: tuple[float, float] | None = None) -> ViewSpec:
    """A view spec of ``family`` at ``size`` with the method's crop range (or ``scale``) and flip setting."""
    return ViewSpec(size=size, family=family, scale=tuple(scale or params.crop_scale), flip=params.flip)


def teacher_target(method: str, teacher_dims: TeacherDims | None, choice: TeacherFeature) -> tuple[str, int]:
    """Pick the teacher output a method regresses/contrasts against: ``("proj"|"pooled", dim)``.

    ``auto`` takes the projection when the teacher has one (the published choice for DisCo, BINGO,
    SEED), otherwise the pooled backbone feature."""
    if teacher_dims is None:
        raise UsageError(f"{method}: this method needs a teacher", hint="pass --teacher NAME or use `pretrain`")
    use_proj = choice == "projection" or (choice == "auto" and teacher_dims.proj is not None)
    if use_proj and teacher_dims.proj is None:
        raise UsageError(f"{method}: the teacher has no projection head",
                         hint="set method.params.teacher_feature=backbone")
    return ("proj", int(teacher_dims.proj)) if use_proj else ("pooled", int(teacher_dims.pooled))


def similarity_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_T ‖ p_S) averaged over the batch ("batchmean"), p = softmax(logits / τ) (CompRess)."""
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1).mean()


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to float32; float64 stays float64."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def float32_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in (at least) float32 even under autocast: with τ as small as 0.04 (CompRess, SMD, DINO),
    bf16's ~3 significant digits would put ~0.1 of noise on every logit."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        dtype = torch.promote_types(at_least_float32(a).dtype, b.dtype)
        return a.to(dtype) @ b.to(dtype).t()


def step_rng(step: int, salt: int = 0, per_rank: bool = True) -> np.random.Generator:
    """A generator keyed by (step, rank, salt): per-step randomness that replays exactly on resume
    and does not consume the global RNG."""
    rank = info().rank if per_rank else 0
    return np.random.Generator(np.random.Philox(key=[step & 0xFFFFFFFFFFFFFFFF, (rank << 32) | (salt & 0xFFFFFFFF)]))


# --- CutMix (BINGO) -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CutBox:
    top: int
    left: int
    height: int
    width: int


def sample_cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> CutBox:
    """CutMix box (Yun et al. 2019): side ratio sqrt(1−λ), centre uniform, clipped to the image."""
    cut_ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    centre_y = int(rng.integers(height))
    centre_x = int(rng.integers(width))
    top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
    left, right = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
    return CutBox(top, left, bottom - top, right - left)


def cutmix(base: torch.Tensor, patch_source: torch.Tensor, box: CutBox) -> tuple[torch.Tensor, float]:
    """Paste ``patch_source``'s pixels inside ``box`` onto ``base``; return the mix and the area-corrected
    λ = 1 − box_area / image_area (the weight of ``base``, exact after clipping the box)."""
    mixed = base.clone()
    rows = slice(box.top, box.top + box.height)
    cols = slice(box.left, box.left + box.width)
    mixed[..., rows, cols] = patch_source[..., rows, cols]
    area = base.shape[-2] * base.shape[-1]
    return mixed, 1.0 - box.height * box.width / area


# --- kNN bags (BINGO stage 0) ---------------------------------------------------------------------------

def knn_bags(features: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """(N, k) indices of each row's k nearest other rows by L2 distance of the L2-normalised features: the one
    neighbour search of the tool (:func:`distillctl.eval.knn.nearest_neighbours`) over features in memory."""
    from distillctl.eval.knn import nearest_neighbours

    normed = F.normalize(features.float(), dim=1)
    return nearest_neighbours(lambda start, stop: normed[start:stop], normed.shape[0], k, chunk)


@dataclass(frozen=True)
class NeighbourView(MethodView):
    """A view of a *neighbour* of the sample (one of its k teacher-kNN bag members), not of the sample.

    All neighbour views of one sample show the same neighbour, drawn by the trainer from the teacher-kNN
    bag table (``distillctl.data.views.draw_neighbour``); their teacher targets are the neighbour's."""

    source: str = "neighbour"


# --- momentum encoders -------------------------------------------------------------------------------------

@torch.no_grad()
def shuffled_forward(encoder: nn.Module, images: torch.Tensor, step: int) -> torch.Tensor:
    """MoCo's shuffle-BN: run ``encoder`` on a batch permuted across all ranks, return outputs in the
    original order. On one process BatchNorm statistics do not depend on order, so it is a plain call."""
    if not is_distributed():
        return encoder(images)
    world = info()
    gathered = all_gather_concat(images)
    # the same permutation on every rank (keyed by the step alone), so no broadcast is needed
    order = step_rng(step, salt=17, per_rank=False).permutation(gathered.shape[0])
    permutation = torch.as_tensor(order, device=images.device)
    local = gathered[permutation.view(world.world_size, -1)[world.rank]]
    outputs = all_gather_concat(encoder(local))
    restored = outputs[torch.argsort(permutation)]
    return restored.view(world.world_size, -1, *restored.shape[1:])[world.rank]


def require_student(inputs_student: nn.Module | None, method: str) -> nn.Module:
    if inputs_student is None:
        raise RuntimeError(f"{method}: the trainer must pass the student backbone in MethodInputs.student")
    return inputs_student


def require_setup(module: nn.Module | None, method: str) -> nn.Module:
    if module is None:
        raise RuntimeError(f"{method}: setup(student) was not called before training")
    return module


# --- multi-crop ----------------------------------------------------------------------------------------------

def scaled_crop_size(image_size: int, size_at_224: int) -> int:
    """A local/small crop size given at ImageNet's 224 px, scaled to the run's global size (≥ 8 px)."""
    return max(8, int(round(image_size * size_at_224 / 224)))


# --- offline teacher artefacts (Noroozi's cluster labels, ReKD's relations) ------------------------------------

@dataclass(frozen=True)
class TeacherArtifact:
    """A per-image table a method trains on, computed once before step 0 from the teacher's centre-crop
    (cache view 0) embeddings of the whole training set and stored beside the feature cache.

    ``kmeans``: (N,) spherical k-means labels with ``size`` clusters (``cache.artifacts.kmeans_labels``);
    ``knn``: (N, size) indices of each image's nearest other images (``cache.artifacts.knn_bags``)."""

    kind: Literal["kmeans", "knn"]
    size: int
    iters: int = 20
    seed: int = 0
    output: str = "pooled"


class UsesTeacherArtifact:
    """Mixin for a :class:`Method` that reads an offline :class:`TeacherArtifact` by dataset index.

    The pipeline computes the table and calls :meth:`use_artifact` before training; ``setup`` then turns it
    into a :class:`SampleState` buffer (:meth:`artifact_state`), so the table is checkpointed with the
    method and a resumed run reads exactly the rows the interrupted one did."""

    name: str
    num_samples: int | None
    _artifact_table: torch.Tensor | None = None

    def teacher_artifact(self) -> TeacherArtifact:
        raise NotImplementedError

    def use_artifact(self, table: torch.Tensor) -> None:
        self._artifact_table = torch.as_tensor(table, dtype=torch.long)

    def artifact_state(self):
        """A SampleState (N × table row shape, int64) holding the handed-over table."""
        from distillctl.methods.sample_state import SampleState

        table = self._artifact_table
        if table is None:
            raise RuntimeError(f"{self.name}: no teacher artefact was handed over before setup() "
                               "(the pipeline computes it from the feature cache)")
        if table.shape[0] != self.num_samples:
            raise RuntimeError(f"{self.name}: the teacher artefact has {table.shape[0]} rows for "
                               f"{self.num_samples} training images")
        state = SampleState(self.num_samples, tuple(table.shape[1:]), torch.long, fill=-1)
        state.update(torch.arange(table.shape[0]), table, gather=False)
        return state
