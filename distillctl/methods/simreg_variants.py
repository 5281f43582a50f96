"""SimReg variants. ``simreg-multi`` distils several teachers at once, one SimReg prediction head per teacher.

The projection-head target (SimReg's ``--teacher_fc``) is ``simreg``'s own ``teacher_feature=projection``.

Several teachers: the recipe lists them as ``teacher.source`` plus ``teacher.extra``; the pipeline loads them
into one :class:`~distillctl.teachers.ensemble.TeacherEnsemble`, constructs the method with a *sequence* of
``TeacherDims`` (one per teacher, in recipe order), and the ensemble answers the outputs ``<output>_<k>``
(``pooled_0``, ``pooled_1``, …) online or from a feature cache that stores them side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from distillctl.errors import UsageError
from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, TeacherDims, register
from distillctl.methods.domains import NonNegative
from distillctl.methods.shared import CropParams, crop_view
from distillctl.methods.simreg import simreg_head, simreg_loss
from distillctl.teachers.ensemble import member_key as multi_teacher_key


class SimRegMultiParams(CropParams):
    teacher_feature: Literal["backbone", "projection"] = "backbone"
    teacher_weights: list[NonNegative] | None = Field(None, description="loss weight per teacher; default 1 each (sum)")


@register
class SimRegMulti(Method):
    name = "simreg-multi"
    title = "SimReg with multiple teachers: one prediction head per teacher (Navaneet et al., BMVC 2021)"
    objective = (
        "As simreg, with K frozen teachers: the student's pooled feature feeds K separate 4-layer prediction heads "
        "h_k (d→2d→d→2d→d_k) and L = Σ_k w_k · mean_b(2 − 2·cos(h_k(S(x)), T_k(x))) on one weakly augmented view "
        "seen by every network (w_k = 1 by default)."
    )
    published = (
        "SimReg (BMVC 2021) reports that distilling several teachers with separate heads works (abstract); the "
        "multi-teacher numbers were not retrieved. Single-teacher SimReg: MoCo-v2 R50 (800ep) → MobileNetV2 69.1, "
        "ResNet-18 65.1 linear."
    )
    Params = SimRegMultiParams
    multi_teacher = True

    def __init__(self, params: SimRegMultiParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        if not isinstance(teacher_dims, Sequence) or len(teacher_dims) < 2:
            raise UsageError("simreg-multi needs two or more teachers (one TeacherDims each)",
                             hint="list several teachers in the recipe, or use `simreg` for one teacher")
        self.output = "proj" if params.teacher_feature == "projection" else "pooled"
        dims = [self._target_dim(d, k) for k, d in enumerate(teacher_dims)]
        weights = params.teacher_weights or [1.0] * len(dims)
        if len(weights) != len(dims):
            raise UsageError(f"simreg-multi: {len(weights)} teacher_weights for {len(dims)} teachers")
        self.weights = weights
        self.heads = nn.ModuleList(simreg_head(student_dim, d) for d in dims)

    def _target_dim(self, dims: TeacherDims, k: int) -> int:
        value = dims.proj if self.output == "proj" else dims.pooled
        if value is None:
            raise UsageError(f"simreg-multi: teacher {k} has no projection head",
                             hint="set method.params.teacher_feature=backbone")
        return int(value)

    def requirements(self, image_size: int) -> Requirements:
        view = crop_view(self.params, image_size, "weak")
        keys = frozenset(multi_teacher_key(self.output, k) for k in range(len(self.heads)))
        return Requirements(views=(MethodView(view),), teacher_outputs=keys, teacher_mode="cached_exact",
                            teacher_bn="eval")

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        feature = inputs.student_features[0]
        total: torch.Tensor | float = 0.0
        logs: dict[str, torch.Tensor | float] = {}
        for k, (head, weight) in enumerate(zip(self.heads, self.weights)):
            term = simreg_loss(head(feature), inputs.teacher_outputs[0][multi_teacher_key(self.output, k)])
            logs[f"cos_{k}"] = 1 - term.detach() / 2
            total = total + weight * term
        return total, logs
