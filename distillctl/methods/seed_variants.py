"""SEED variants. ``seed-smallpatch`` is SEED's ``main_small-patch.py`` recipe (the SwAV / 800-epoch
results): six extra small crops per image, seen by both networks, contrasted against their own queue."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from distillctl.methods.base import MethodInputs, MethodView, Requirements, register
from distillctl.methods.common import FeatureQueue
from distillctl.methods.domains import Count, CropScale, NonNegative
from distillctl.methods.seed import Seed, SeedParams, seed_loss
from distillctl.methods.shared import crop_view, scaled_crop_size


class SeedSmallPatchParams(SeedParams):
    crop_scale: CropScale = (0.14, 1.0)  # swav_aug: RandomResizedCrop(224, scale=(0.14, 1))
    small_crops: int = Field(6, ge=1)
    small_crop_size: Count = 96  # at 224 px; scaled with data.image_size
    small_crop_scale: CropScale = (0.05, 0.14)
    small_weight: NonNegative = 1.0  # loss = CE(main) + small_weight · CE(small crops)


@register
class SeedSmallPatch(Seed):
    name = "seed-smallpatch"
    title = "SEED with small patches: self-supervised distillation, multi-crop variant (Fang et al., ICLR 2021)"
    objective = (
        "SEED on the main 224-px view (crop scale 0.14–1) plus 6 extra 96-px crops (scale 0.05–0.14) per image, "
        "each embedded by teacher and student. Main: −Σ softmax([t·t, t·Q]/τ_T)·log softmax([s·t, s·Q]/τ_S); "
        "small crops: the same with their own queue Q_small; L = L_main + L_small (mean over all small crops). "
        "The main teacher embedding enters Q and the first small crop's enters Q_small (K=65536 each)."
    )
    published = (
        "R50×2 SwAV teacher, 800 epochs with small patches, ImageNet linear: EfficientNet-B0 67.6, MobileNetV3-L 68.2 "
        "(abstract), ResNet-18 63.0, ResNet-34 65.7 (jacobswan1/SEED main_small-patch.py; BINGO's table)."
    )
    Params = SeedSmallPatchParams

    def __init__(self, params: SeedSmallPatchParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.small_queue = FeatureQueue(params.queue_size, self.queue.data.shape[1])

    def requirements(self, image_size: int) -> Requirements:
        main = crop_view(self.params, image_size, self.params.augmentation)
        small = crop_view(self.params, scaled_crop_size(image_size, self.params.small_crop_size),
                          self.params.augmentation, scale=self.params.small_crop_scale)
        views = (MethodView(main),) + (MethodView(small),) * self.params.small_crops
        # online: the feature cache stores views of one spec, and the small crops have their own. The small
        # crops go through student and teacher as one batch, as main_small-patch.py does (B·6 crops per call).
        return Requirements(views=views, teacher_outputs=frozenset({self.target_key}), teacher_mode="online",
                            teacher_bn="eval", grouping="by_resolution")

    def _embed(self, inputs: MethodInputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        students = [F.normalize(self.head(f), dim=1) for f in inputs.student_features]
        teachers = [F.normalize(out[self.target_key].to(students[0].dtype), dim=1) for out in inputs.teacher_outputs]
        return students, teachers

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        students, teachers = self._embed(inputs)
        tau_s, tau_t = self.params.student_temperature, self.params.teacher_temperature
        dtype = students[0].dtype
        main = seed_loss(students[0], teachers[0], self.queue.data.to(dtype), tau_s, tau_t)
        small = seed_loss(torch.cat(students[1:]), torch.cat(teachers[1:]), self.small_queue.data.to(dtype), tau_s, tau_t)
        return main + self.params.small_weight * small, {"main": main.detach(), "small": small.detach()}

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        self.queue.enqueue(F.normalize(inputs.teacher_outputs[0][self.target_key].float(), dim=1))
        self.small_queue.enqueue(F.normalize(inputs.teacher_outputs[1][self.target_key].float(), dim=1))
