"""``dense-reg``: plain feature-map regression, the dense counterpart of ``cosine-reg`` / ``mse-reg``.

The student's stage map is resized (bilinear) to the teacher map's grid and projected by a 1×1 convolution to
the teacher's channels; the loss compares the two maps location by location. No contrast, no queue, no
attention head: the baseline that shows what PCD adds. Both networks see the same weakly augmented view.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, register
from distillctl.methods.dense_common import MapGeometry, as_map, map_geometry, teacher_map_geometry
from distillctl.methods.shared import CropParams, crop_view


class DenseRegParams(CropParams):
    loss: Literal["cosine", "mse"] = "cosine"  # cosine: mean(2 − 2·cos) per location; mse: mean squared error
    student_tap: str = "stage:-1"  # the last stage map (CNN) or block tokens (ViT)
    teacher_tap: str = "stage:-1"
    teacher_bn: Literal["eval", "train"] = "eval"


def dense_regression_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, kind: str) -> torch.Tensor:
    """``cosine``: mean over batch and locations of 2 − 2·cos(s, t) along channels; ``mse``: mean of (s − t)²."""
    if kind == "cosine":
        return (2 - 2 * F.cosine_similarity(student_map, teacher_map, dim=1)).mean()
    return F.mse_loss(student_map, teacher_map)


@register
class DenseRegression(Method):
    name = "dense-reg"
    title = "Dense feature-map regression baseline (the dense counterpart of cosine-reg)"
    objective = (
        "L = mean_{b,h,w} ℓ(P(resize(S_map(x)))[b,:,h,w], T_map(x)[b,:,h,w]) with ℓ = 2 − 2·cos (default) or the "
        "squared error; S_map/T_map are the last stage maps (ViT: patch tokens of the last block on their grid), "
        "resize is bilinear to the teacher's grid, P a 1×1 convolution to the teacher's channels. One weakly "
        "augmented view seen by both networks."
    )
    published = (
        "Baseline, no paper of its own: feature-map regression at the last stage (FitNets-style hint learning), "
        "the dense counterpart of cosine-reg, to be set beside PCD's pixel-wise contrast; no published numbers."
    )
    sources = "No official code (a baseline defined here); the loss is checked against a per-location loop in tests."
    assumptions = (
        "Resize then project: the student map is bilinearly resized (align_corners=False) to the teacher grid, "
        "then a 1×1 convolution with bias maps its channels to the teacher's (both linear, so the order only "
        "matters at the borders of the interpolation, not in value).",
        "ViT maps: the tokens of the tapped block without CLS/register tokens, reshaped to the square patch grid.",
        "The teacher's map is of the student's own view, so a feature cache that stores it (the run's cache stores "
        "the teacher tap beside the pooled vector) stands in for the teacher exactly (cached_exact); online when "
        "the maps would be too large to cache.",
    )
    Params: ClassVar[type[DenseRegParams]] = DenseRegParams

    def __init__(self, params: DenseRegParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.teacher_geometry = teacher_map_geometry(self.name, teacher_dims, params.teacher_tap)
        self.student_geometry = MapGeometry(0)
        self.projector: nn.Module = nn.Identity()

    def setup(self, student: nn.Module) -> None:
        """Size the 1×1 projector from the student's tapped stage (known only once the student exists)."""
        self.student_geometry = map_geometry(student, self.params.student_tap)
        channels, target = self.student_geometry.channels, self.teacher_geometry.channels
        self.projector = nn.Conv2d(channels, target, kernel_size=1)

    def requirements(self, image_size: int) -> Requirements:
        view = crop_view(self.params, image_size, "weak")
        return Requirements(views=(MethodView(view),), teacher_outputs=frozenset({"pooled"}),
                            teacher_mode="cached_exact",
                            teacher_bn=self.params.teacher_bn, student_taps=(self.params.student_tap,),
                            teacher_taps=(self.params.teacher_tap,))

    def maps(self, inputs: MethodInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected student map on the teacher grid, teacher map)."""
        student_map = as_map(inputs.student_taps[0][self.params.student_tap], self.student_geometry.prefix_tokens)
        teacher_map = as_map(inputs.teacher_outputs[0][self.params.teacher_tap], self.teacher_geometry.prefix_tokens)
        resized = F.interpolate(student_map, size=teacher_map.shape[-2:], mode="bilinear", align_corners=False)
        return self.projector(resized), teacher_map.detach().to(resized.dtype)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        prediction, target = self.maps(inputs)
        loss = dense_regression_loss(prediction, target, self.params.loss)
        cosine = F.cosine_similarity(prediction.detach(), target, dim=1).mean()
        return loss, {"cos": cosine.detach()}
