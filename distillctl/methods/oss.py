"""OSS, one-stage self-supervised distillation ("Unsupervised Representation Transfer for Small Networks: I Believe
I Can Distill On-the-Fly", Choi, Kang, Oh; NeurIPS 2021): the teacher learns by SSL while the student distils from
it in the same run, instead of pre-training the teacher first.

Only the concept is sourced (the title); no official code and no readable copy of the paper were found. This is
distillctl's construction of that concept from parts the catalogue already checks: the teacher (co-trained, from
scratch: ``teacher.source: scratch``) trains by SimCLR's NT-Xent on its own projection; the student regresses the
teacher's projection of the same view through an MLP predictor (SimReg's 2 − 2·cos), the teacher detached, with a
distillation weight that can ramp up while the teacher is still near random. Every choice is listed in
``assumptions``.
"""

from __future__ import annotations

import torch

from distillctl.errors import UsageError
from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, TeacherDims, register
from distillctl.methods.common import mlp
from distillctl.methods.domains import Count, CropScale, NonNegative, Positive
from distillctl.methods.shared import CropParams, crop_view
from distillctl.methods.simclr import nt_xent
from distillctl.methods.simreg import simreg_loss


class OSSParams(CropParams):
    crop_scale: CropScale = (0.08, 1.0)  # SimCLR's RandomResizedCrop
    temperature: Positive = 0.2  # the teacher's NT-Xent τ (distillctl's SimCLR default)
    teacher_hidden_dim: Count = 2048  # teacher projection Linear(D, 2048)–BN–ReLU–Linear(2048, 128)
    projection_dim: Count = 128
    predictor_hidden_dim: Count = 2048  # student predictor Linear(d, 2048)–BN–ReLU–Linear(2048, 128)
    distill_weight: NonNegative = 1.0  # λ of the student's regression term
    # epochs over which λ ramps linearly from 0 (the teacher starts random: early targets carry little); 0: none
    distill_warmup_epochs: NonNegative = 0.0


def distill_weight(weight: float, warmup_epochs: float, epoch: float) -> float:
    """λ, ramped linearly from 0 over ``warmup_epochs`` (fractional epochs), then constant."""
    if warmup_epochs <= 0:
        return weight
    return weight * min(1.0, epoch / warmup_epochs)


@register
class OSS(Method):
    name = "oss"
    title = "OSS: Unsupervised representation transfer for small networks, distil on-the-fly (Choi et al., NeurIPS 2021)"
    objective = (
        "One stage: teacher T (co-trained, from scratch) with projection h = Linear(D,2048)–BN–ReLU–Linear(2048,128) "
        "learns by NT-Xent(h(T(x1)), h(T(x2)); τ = 0.2); at the same time the student S with predictor "
        "q = Linear(d,2048)–BN–ReLU–Linear(2048,128) regresses the teacher's projection of the same view: "
        "L_distil = Σ_v mean_b(2 − 2·cos(q(S(x_v)), sg[h(T(x_v))])). L = L_SSL(T) + λ(e)·L_distil, λ = 1 (optionally "
        "ramped from 0 over distill_warmup_epochs). No official code: a construction from the title's concept."
    )
    published = "Not retrieved: the paper's tables, settings and numbers are unavailable here (no PDF, no code)."
    sources = (
        "No official code found (searched the public code and pages available here for the title); paper text not "
        "retrievable "
        "(docs/methods.md §14: 'under-specified'). Nothing is checked against an official implementation; the "
        "parts reused are distillctl's NT-Xent (simclr, loop-tested) and SimReg's regression loss (simreg)."
    )
    assumptions = (
        "The whole method beyond 'the teacher learns by SSL while the student distils from it in the same run' is "
        "assumed; the paper's own losses, heads and schedule may differ.",
        "Teacher SSL: SimCLR NT-Xent (τ 0.2) on a 128-d projection, the most common contrastive recipe for a teacher "
        "trained from scratch; any other SSL loss would fit the concept.",
        "Distillation: SimReg-style regression (MLP predictor, 2 − 2·cos) of the teacher's projection of the same "
        "view, chosen because it needs no queue (the teacher's embedding space moves every step, so queued "
        "teacher embeddings would be stale) and is the best-measured regression method in this catalogue.",
        "The teacher is detached in the distillation term, so the student does not pull the teacher towards itself "
        "(one-way transfer, as the word 'distil' implies); the teacher learns by its SSL loss only.",
        "λ = 1 from the first step (distill_warmup_epochs 0): with a random teacher the early targets are weak but "
        "harmless; a ramp is available.",
        "Views: two SimCLR views seen by both networks (same tensors), BatchNorm of both in train mode.",
        "The teacher's projection head lives in the method (heads.safetensors, teacher_head.*) and trains in the "
        "student's optimiser group; the teacher backbone trains in the teacher group (teacher_lr_scale 1).",
        "Cache: none; the teacher trains with the student, so it is online by construction.",
    )
    Params = OSSParams

    def __init__(self, params: OSSParams, student_dim: int, teacher_dims: TeacherDims | None) -> None:
        super().__init__(params, student_dim, teacher_dims)
        if teacher_dims is None:
            raise UsageError("oss trains its teacher with the student; give it one",
                             hint="--teacher scratch --teacher-arch resnet50")
        self.teacher_head = mlp([teacher_dims.pooled, params.teacher_hidden_dim, params.projection_dim])
        self.predictor = mlp([student_dim, params.predictor_hidden_dim, params.projection_dim])

    def requirements(self, image_size: int) -> Requirements:
        view = MethodView(crop_view(self.params, image_size, "simclr"))
        return Requirements(views=(view, view), teacher_outputs=frozenset({"pooled"}), teacher_mode="co_trained",
                            teacher_bn="train")

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        teacher = [self.teacher_head(out["pooled"].to(inputs.student_features[0].dtype))
                   for out in inputs.teacher_outputs]
        ssl = nt_xent(teacher[0], teacher[1], self.params.temperature)
        distil = sum(simreg_loss(self.predictor(feature), target.detach())
                     for feature, target in zip(inputs.student_features, teacher))
        weight = distill_weight(self.params.distill_weight, self.params.distill_warmup_epochs, inputs.epoch)
        return ssl + weight * distil, {"ssl_t": ssl.detach(), "distil": distil.detach(),
                                       "distill_weight": weight}
