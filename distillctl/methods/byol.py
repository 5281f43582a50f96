"""BYOL (Grill et al., NeurIPS 2020) as an SSL-only method: the "student trained alone" baseline and
a ``pretrain`` option. The target network is an EMA of the online backbone + projector."""

from __future__ import annotations

import torch
from torch import nn

from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, register
from distillctl.methods.common import EMA, cosine_momentum, mlp
from distillctl.methods.domains import Count, CropScale, Momentum
from distillctl.methods.shared import BackboneWithHead, CropParams, crop_view, require_setup, require_student
from distillctl.methods.simreg import simreg_loss
from distillctl.methods.collapse import LOG_KEY, embedding_cosine


class BYOLParams(CropParams):
    crop_scale: CropScale = (0.08, 1.0)  # BYOL: RandomResizedCrop with the standard scale
    projector_hidden_dim: Count = 4096
    projection_dim: Count = 256
    predictor_hidden_dim: Count = 4096
    momentum: Momentum = 0.996  # base τ of the target EMA
    momentum_schedule: bool = True  # τ rises to 1 along a half cosine over training


@register
class BYOL(Method):
    name = "byol"
    kind = "ssl"
    title = "BYOL: Bootstrap your own latent (Grill et al., NeurIPS 2020)"
    objective = (
        "Two asymmetric views (byol1: blur 1.0; byol2: blur 0.1, solarize 0.2). Online: z = g(S(x)) with projector "
        "g = Linear(d,4096)–BN–ReLU–Linear(4096,256), prediction p = q(z) with the same shape of MLP. Target: an EMA "
        "copy of S and g (τ from 0.996 to 1 on a cosine). L = mean_b(2 − 2·cos(p1, z'2)) + mean_b(2 − 2·cos(p2, z'1)), "
        "no gradient through the target. No negatives, no teacher."
    )
    published = (
        "ResNet-50, ImageNet linear (deepmind-research/byol): 74.3 top-1 after 1000 epochs, 72.5 after 300 "
        "(batch 4096, LARS lr 0.2·B/256, wd 1.5e-6)."
    )
    Params = BYOLParams

    def __init__(self, params: BYOLParams, student_dim: int, teacher_dims=None) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.head = mlp([student_dim, params.projector_hidden_dim, params.projection_dim])
        self.predictor = mlp([params.projection_dim, params.predictor_hidden_dim, params.projection_dim])
        self.target: EMA | None = None

    def setup(self, student: nn.Module) -> None:
        self.target = EMA(BackboneWithHead(student, self.head))

    def requirements(self, image_size: int) -> Requirements:
        views = tuple(MethodView(crop_view(self.params, image_size, family), teacher=False) for family in ("byol1", "byol2"))
        return Requirements(views=views, teacher_outputs=frozenset(), teacher_mode="none")

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        target = require_setup(self.target, self.name)
        predictions = [self.predictor(self.head(f)) for f in inputs.student_features]
        with torch.no_grad():
            targets = [target(img).to(predictions[0].dtype) for img in inputs.images]
        loss = simreg_loss(predictions[0], targets[1]) + simreg_loss(predictions[1], targets[0])
        return loss, {"cos": 1 - loss.detach() / 4, LOG_KEY: embedding_cosine(predictions[0])}

    def momentum(self, epoch: float, total_epochs: int) -> float:
        if not self.params.momentum_schedule:
            return self.params.momentum
        return cosine_momentum(self.params.momentum, epoch / max(1, total_epochs))

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        student = require_student(inputs.student, self.name)
        self.target.update(BackboneWithHead(student, self.head), self.momentum(inputs.epoch, inputs.total_epochs))
