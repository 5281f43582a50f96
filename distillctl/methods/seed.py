"""SEED (Fang et al., ICLR 2021): match the teacher's similarity distribution over a teacher queue."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from distillctl.data.views import ViewSpec
from distillctl.methods.base import Method, MethodInputs, MethodParams, MethodView, Requirements, register
from distillctl.methods.common import FeatureQueue, mlp_relu, soft_cross_entropy
from distillctl.methods.domains import Count, CropScale, Positive
from distillctl.methods.shared import at_least_float32


class SeedParams(MethodParams):
    queue_size: Count = 65536
    student_temperature: Positive = 0.2
    teacher_temperature: Positive = 1e-4
    teacher_feature: Literal["auto", "backbone", "projection"] = "auto"  # auto: projection when the teacher has one
    head_dim: Count | None = None  # default: the teacher target's dim (128 for MoCo v2)
    augmentation: Literal["mocov2", "simclr", "weak"] = "mocov2"
    crop_scale: CropScale = (0.2, 1.0)
    flip: bool = True


def seed_loss(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor,
              student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """−Σ p_T log p_S with p_T = softmax([t·t, t·Q]/τ_T), p_S = softmax([s·t, s·Q]/τ_S); inputs L2-normalised."""
    teacher_logits = torch.cat([(teacher * teacher).sum(1, keepdim=True), teacher @ queue.t()], dim=1)
    student_logits = torch.cat([(student * teacher).sum(1, keepdim=True), student @ queue.t()], dim=1)
    target = F.softmax(teacher_logits / teacher_temperature, dim=1)
    return soft_cross_entropy(student_logits / student_temperature, target)


@register
class Seed(Method):
    name = "seed"
    title = "SEED: Self-supervised Distillation for visual representation (Fang et al., ICLR 2021)"
    objective = (
        "Teacher and student embed the same augmented view; t = n(T(x)), s = n(g(S(x))) with g = Linear(d,d)–ReLU–"
        "Linear(d,D). Over [t, queue Q of past teacher embeddings] the student matches the teacher's similarity "
        "distribution: L = −Σ softmax([t·t, t·Q]/τ_T) · log softmax([s·t, s·Q]/τ_S), τ_S=0.2, τ_T=1e-4; t is enqueued "
        "(K=65536). With tiny τ_T this is InfoNCE with the teacher embedding as positive."
    )
    published = (
        "R50 MoCo-v2 200ep teacher (67.4): EfficientNet-B0 61.3, MobileNetV3-L 55.2, ResNet-18 57.6 linear "
        "(vs MoCo-v2 alone 42.2 / 36.3 / 52.5). Recipe: SGD lr 0.03, batch 256, wd 1e-4, cosine, 200 epochs."
    )
    Params = SeedParams

    def __init__(self, params: SeedParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        use_proj = params.teacher_feature == "projection" or (params.teacher_feature == "auto" and teacher_dims.proj)
        if use_proj and teacher_dims.proj is None:
            from distillctl.errors import UsageError

            raise UsageError("seed: the teacher has no projection head; set method.params.teacher_feature=backbone")
        self.target_key = "proj" if use_proj else "pooled"
        target_dim = teacher_dims.proj if use_proj else teacher_dims.pooled
        self.head = mlp_relu([student_dim, student_dim, params.head_dim or target_dim])
        if (params.head_dim or target_dim) != target_dim:
            from distillctl.errors import UsageError

            raise UsageError(f"seed: head_dim must equal the teacher target dim ({target_dim})")
        self.queue = FeatureQueue(params.queue_size, target_dim)

    def requirements(self, image_size: int) -> Requirements:
        view = ViewSpec(size=image_size, family=self.params.augmentation, scale=self.params.crop_scale,
                        flip=self.params.flip)
        return Requirements(views=(MethodView(view),), teacher_outputs=frozenset({self.target_key}),
                            teacher_mode="cached_exact", teacher_bn="eval")

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        head_out = self.head(inputs.student_features[0])
        # τ_T = 1e-4 amplifies every rounding of t·Q ten-thousandfold: targets, queue and logits stay in (at
        # least) fp32 even under AMP; only the student head above runs in the autocast dtype
        with torch.autocast(device_type=head_out.device.type, enabled=False):
            teacher = F.normalize(at_least_float32(inputs.teacher_outputs[0][self.target_key]), dim=1)
            student = F.normalize(head_out.to(torch.promote_types(at_least_float32(head_out).dtype, teacher.dtype)), dim=1)
            queue = self.queue.data.to(student.dtype)
            loss = seed_loss(student, teacher.to(student.dtype), queue, self.params.student_temperature,
                             self.params.teacher_temperature)
        agreement = (student * teacher).sum(1).mean().detach()
        return loss, {"cos": agreement}

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        teacher = F.normalize(inputs.teacher_outputs[0][self.target_key].float(), dim=1)
        self.queue.enqueue(teacher)
