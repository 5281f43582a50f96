"""SimReg (Navaneet et al., BMVC 2021): cosine regression through a deep prediction head."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from distillctl.data.views import ViewSpec
from distillctl.methods.base import Method, MethodInputs, MethodParams, MethodView, Requirements, register
from distillctl.methods.common import mlp
from distillctl.methods.domains import CropScale


class SimRegParams(MethodParams):
    teacher_feature: Literal["backbone", "projection"] = "backbone"  # --teacher_fc uses the projection
    crop_scale: CropScale = (0.2, 1.0)  # single weak view: RandomResizedCrop(0.2-1) + flip
    flip: bool = True


def simreg_head(student_dim: int, target_dim: int) -> torch.nn.Sequential:
    """d → 2d → d → 2d → d_T with BN+ReLU after layers 1 and 3 only (none between the two halves)."""
    return mlp([student_dim, 2 * student_dim, student_dim, 2 * student_dim, target_dim], norm_after=(0, 2))


def simreg_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_b (2 − 2·cos(prediction_b, target_b))."""
    return (2 - 2 * F.cosine_similarity(prediction, target.to(prediction.dtype), dim=1)).mean()


@register
class SimReg(Method):
    name = "simreg"
    title = "SimReg: Regression for self-supervised knowledge distillation (Navaneet et al., BMVC 2021)"
    objective = (
        "The student's pooled feature goes through a 4-layer MLP prediction head h (d→2d→d→2d→d_T, BN+ReLU after "
        "layers 1 and 3) and regresses the frozen teacher's feature of the same weakly augmented view: "
        "L = mean_b(2 − 2·cos(h(S(x)), T(x))). The head is dropped after training."
    )
    published = (
        "MoCo-v2 R50 (800ep) → MobileNetV2: 69.1 linear / 55.5 1-NN; → ResNet-18: 65.1 / 54.8 (ImageNet, "
        "UCDvision/simreg README). Recipe: SGD lr 0.05, batch 256, wd 1e-4, cosine, 130 epochs."
    )
    Params = SimRegParams

    def __init__(self, params: SimRegParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.target_key = "proj" if params.teacher_feature == "projection" else "pooled"
        target_dim = teacher_dims.proj if self.target_key == "proj" else teacher_dims.pooled
        if target_dim is None:
            from distillctl.errors import UsageError

            raise UsageError("simreg: the teacher has no projection head; set method.params.teacher_feature=backbone")
        self.head = simreg_head(student_dim, target_dim)

    def requirements(self, image_size: int) -> Requirements:
        view = ViewSpec(size=image_size, family="weak", scale=self.params.crop_scale, flip=self.params.flip)
        return Requirements(views=(MethodView(view),), teacher_outputs=frozenset({self.target_key}),
                            teacher_mode="cached_exact", teacher_bn="eval")

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        prediction = self.head(inputs.student_features[0])
        target = inputs.teacher_outputs[0][self.target_key]
        loss = simreg_loss(prediction, target)
        return loss, {"cos": 1 - loss.detach() / 2}
