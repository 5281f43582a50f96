"""ProtoSEED (NeurIPS 2021 workshop, no text or code found): SEED with learned prototypes in place of the instance
queue.

SEED's student matches the teacher's similarity distribution over [itself, a FIFO queue of past teacher
embeddings]. Here the queue is replaced by K prototypes in the teacher's embedding space, learned by online
k-means on the teacher embeddings: the anchors become cluster centres instead of single past images.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, register
from distillctl.methods.common import mlp_relu
from distillctl.methods.seed import seed_loss
from distillctl.methods.shared import CropParams, TeacherFeature, at_least_float32, crop_view, teacher_target
from distillctl._infra import all_gather_concat


class ProtoSEEDParams(CropParams):
    num_prototypes: int = Field(3000, ge=1)  # SwAV's count for ImageNet (no ProtoSEED source)
    prototype_momentum: float = Field(0.9, ge=0, lt=1)  # online k-means: C_k ← n(m·C_k + (1−m)·mean of its t)
    student_temperature: float = Field(0.2, gt=0)  # SEED's τ_S
    teacher_temperature: float = Field(0.04, gt=0)  # not SEED's 1e-4: see the assumptions
    teacher_feature: TeacherFeature = "auto"  # auto: the projection when the teacher has one (SEED)
    augmentation: Literal["mocov2", "simclr", "weak"] = "mocov2"


@torch.no_grad()
def kmeans_update(prototypes: torch.Tensor, embeddings: torch.Tensor, momentum: float) -> torch.Tensor:
    """One online k-means step on unit vectors: each embedding goes to its most similar prototype; every prototype
    with at least one member moves to n(m·C_k + (1−m)·mean of its members); the others stay. Returns the counts."""
    assignment = (embeddings @ prototypes.t()).argmax(dim=1)
    counts = torch.bincount(assignment, minlength=prototypes.shape[0])
    sums = torch.zeros_like(prototypes).index_add_(0, assignment, embeddings)
    used = counts > 0
    means = sums[used] / counts[used].unsqueeze(1).to(sums.dtype)
    prototypes[used] = F.normalize(momentum * prototypes[used] + (1 - momentum) * means, dim=1)
    return counts


@register
class ProtoSEED(Method):
    name = "protoseed"
    title = "ProtoSEED: Prototypical self-supervised representation distillation (NeurIPS 2021 workshop; SEED with prototypes)"
    objective = (
        "Teacher and student embed the same augmented view; t = n(T(x)), s = n(g(S(x))) with g = Linear(d,d)–ReLU–"
        "Linear(d,D) as in SEED. Over [t, K = 3000 prototypes C] the student matches the teacher's similarity "
        "distribution: L = −Σ softmax([t·t, t·C]/τ_T) · log softmax([s·t, s·C]/τ_S), τ_S = 0.2, τ_T = 0.04. The "
        "prototypes are learned by online k-means on the teacher embeddings (each t joins its nearest prototype, "
        "which moves to n(0.9·C_k + 0.1·mean of its members)); they receive no gradient."
    )
    published = "No abstract, text, numbers or code retrieved (docs/methods.md §17)."
    sources = (
        "No official code and no paper text found; the method is reconstructed from its title as SEED "
        "(jacobswan1/SEED, see `methods show seed`) with learned prototypes in place of the instance queue, the "
        "reading docs/methods.md §17 and the issue suggest. Nothing here is checked against a ProtoSEED source."
    )
    assumptions = (
        "Prototypes replace SEED's queue one for one (the self slot t·t stays), as the title and the brief suggest; "
        "the sources show nothing else.",
        "Prototype learning: online k-means on the (all-gathered) teacher embeddings after each step, not gradient "
        "descent. With SEED's targets the prototypes act as negatives, so a gradient would push them away from the "
        "data until they stop being anchors; k-means keeps them in the teacher's space like the queue's entries. "
        "A prototype nobody joins keeps its random unit-vector start (as SEED's unfilled queue rows).",
        "τ_T = 0.04 instead of SEED's 1e-4: with 1e-4 the target is one-hot on the self slot and the student would "
        "be pushed away from the centre of its own cluster; 0.04 (ProtoCPC's teacher temperature) lets the nearest "
        "prototypes carry target mass. τ_S = 0.2 as SEED.",
        "K = 3000 (SwAV's ImageNet prototype count) and k-means momentum 0.9 (a centre follows its last ~10 "
        "members, enough to move from the random start within a short run).",
        "Views, head and teacher output as SEED: one MoCo-v2 view seen by both networks (cached_exact), the "
        "teacher's projection when it has one.",
    )
    Params = ProtoSEEDParams

    def __init__(self, params: ProtoSEEDParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.target_key, target_dim = teacher_target(self.name, teacher_dims, params.teacher_feature)
        self.head = mlp_relu([student_dim, student_dim, target_dim])
        self.register_buffer("prototypes", F.normalize(torch.randn(params.num_prototypes, target_dim), dim=1))

    def requirements(self, image_size: int) -> Requirements:
        view = crop_view(self.params, image_size, self.params.augmentation)
        return Requirements(views=(MethodView(view),), teacher_outputs=frozenset({self.target_key}),
                            teacher_mode="cached_exact")

    def _teacher(self, inputs: MethodInputs) -> torch.Tensor:
        return F.normalize(at_least_float32(inputs.teacher_outputs[0][self.target_key]), dim=1)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        student = F.normalize(at_least_float32(self.head(inputs.student_features[0])), dim=1)
        teacher = self._teacher(inputs).to(student.dtype)
        with torch.autocast(device_type=student.device.type, enabled=False):  # τ_T = 0.04 logits in ≥ float32
            loss = seed_loss(student, teacher, self.prototypes.to(student.dtype), self.params.student_temperature,
                             self.params.teacher_temperature)
        return loss, {"cos": (student * teacher).sum(1).mean().detach()}

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        embeddings = all_gather_concat(self._teacher(inputs)).to(self.prototypes.dtype)
        kmeans_update(self.prototypes, embeddings, self.params.prototype_momentum)
