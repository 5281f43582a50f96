"""CompRess (Abbasi Koohpayegani et al., NeurIPS 2020): match the teacher's similarity distribution over a
large bank of anchors. ``compress-2q`` keeps a student (EMA) queue beside the teacher queue;
``compress-1q`` maps the student into the teacher's space with a linear layer and uses the teacher
queue only."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distillctl.data.views import ViewSpec
from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, register
from distillctl.methods.common import EMA, FeatureQueue
from distillctl.methods.domains import Count, CropScale, Momentum, Positive
from distillctl.methods.shared import (CropParams, crop_view, float32_similarity, require_setup, require_student,
                                       similarity_kl, teacher_target)

_PUBLISHED = (
    "Teacher MoCo-v2 R50 800ep (70.8), ImageNet linear / NN (UMBCvision/CompRess): ResNet-18 2q 61.7 / 53.4, "
    "1q 62.6 / 53.5; MobileNetV2 2q 63.0 / 54.4, 1q 65.8 / 54.8; SwAV R50 → R18 1q 65.6 / 56.0, 2q 62.4. "
    "Recipe: SGD lr 0.01, batch 256, wd 1e-4, 130 epochs, lr ×0.2 at epochs 90 and 120."
)


class CompRessParams(CropParams):
    queue_size: Count = 128_000  # anchors
    temperature: Positive = 0.04
    teacher_feature: Literal["backbone", "projection"] = "backbone"  # published: pooled backbone, fc removed
    # same_view: teacher and student see the same RandomResizedCrop (train_student.py);
    # centre: the teacher sees a centre crop, as in the cached mode (cache_feats.py) that the papers report.
    teacher_input: Literal["same_view", "centre"] = "same_view"
    crop_scale: CropScale = (0.08, 1.0)  # RandomResizedCrop(224) with torchvision's default scale
    teacher_bn: Literal["eval", "train"] = "eval"


class CompRess2qParams(CompRessParams):
    momentum: Momentum = 0.999  # EMA student key encoder filling the student queue


class _CompRessBase(Method):
    """Views, teacher queue and the KL; subclasses define the student side."""

    Params: ClassVar[type[CompRessParams]] = CompRessParams

    def __init__(self, params: CompRessParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.target_key, self.target_dim = teacher_target(self.name, teacher_dims, params.teacher_feature)
        self.teacher_queue = FeatureQueue(params.queue_size, self.target_dim)

    def requirements(self, image_size: int) -> Requirements:
        crop = crop_view(self.params, image_size, "weak")
        if self.params.teacher_input == "same_view":
            views = (MethodView(crop),)
        else:
            views = (MethodView(crop, teacher=False), MethodView(ViewSpec(size=image_size, family="centre"), student=False))
        return Requirements(views=views, teacher_outputs=frozenset({self.target_key}), teacher_mode="cached_exact",
                            teacher_bn=self.params.teacher_bn)

    def _teacher(self, inputs: MethodInputs, dtype: torch.dtype) -> torch.Tensor:
        slot = 0 if self.params.teacher_input == "same_view" else 1
        return F.normalize(inputs.teacher_outputs[slot][self.target_key].to(dtype), dim=1)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        student, anchors = self._student(inputs)
        teacher = self._teacher(inputs, student.dtype)
        teacher_logits = float32_similarity(teacher, self.teacher_queue.data)
        loss = similarity_kl(teacher_logits, float32_similarity(student, anchors), self.params.temperature)
        return loss, {"kl": loss.detach()}

    def _student(self, inputs: MethodInputs) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@register
class CompRess2q(_CompRessBase):
    name = "compress-2q"
    title = "CompRess: Self-supervised learning by compressing representations, two queues (NeurIPS 2020)"
    objective = (
        "Teacher and student (no heads) see the same augmented image; t = n(T(x)) (pooled), s = n(S(x)), and an EMA "
        "copy of the student (m=0.999) fills a student queue Q_S in step with the teacher queue Q_T (128 000 anchors). "
        "L = KL(softmax(t·Q_T/τ) ‖ softmax(s·Q_S/τ)) (batch mean), τ = 0.04: the student reproduces the teacher's "
        "similarity distribution over the anchor bank. teacher_input=centre replays the cached centre-crop mode."
    )
    published = _PUBLISHED
    Params = CompRess2qParams

    def __init__(self, params: CompRess2qParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.student_queue = FeatureQueue(params.queue_size, student_dim)
        self.key_encoder: EMA | None = None

    def setup(self, student: nn.Module) -> None:
        self.key_encoder = EMA(student)

    def _student(self, inputs: MethodInputs) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = require_setup(self.key_encoder, self.name)
        with torch.no_grad():
            inputs.extras["compress_keys"] = F.normalize(encoder(inputs.images[0]).float(), dim=1)
        student = F.normalize(inputs.student_features[0], dim=1)
        return student, self.student_queue.data.to(student.dtype)

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        self.key_encoder.update(require_student(inputs.student, self.name), self.params.momentum)
        self.teacher_queue.enqueue(self._teacher(inputs, torch.float32))
        self.student_queue.enqueue(inputs.extras["compress_keys"])


@register
class CompRess1q(_CompRessBase):
    name = "compress-1q"
    title = "CompRess: Self-supervised learning by compressing representations, one queue (NeurIPS 2020)"
    objective = (
        "Teacher and student see the same augmented image; t = n(T(x)) (pooled), s = n(W·S(x)) with a trainable "
        "Linear(d_s→d_T). Both are compared with the teacher queue Q_T only (128 000 anchors): "
        "L = KL(softmax(t·Q_T/τ) ‖ softmax(s·Q_T/τ)), τ = 0.04; only teacher features are enqueued. "
        "teacher_input=centre replays the cached centre-crop mode."
    )
    published = _PUBLISHED

    def __init__(self, params: CompRessParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.head = nn.Linear(student_dim, self.target_dim)

    def _student(self, inputs: MethodInputs) -> tuple[torch.Tensor, torch.Tensor]:
        student = F.normalize(self.head(inputs.student_features[0]), dim=1)
        return student, self.teacher_queue.data.to(student.dtype)

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        self.teacher_queue.enqueue(self._teacher(inputs, torch.float32))
