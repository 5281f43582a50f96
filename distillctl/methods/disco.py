"""DisCo (Gao et al., ECCV 2022): student MoCo v2 plus regression of the final embedding onto the teacher's."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, register
from distillctl.methods.common import EMA, FeatureQueue, info_nce, mlp_relu
from distillctl.methods.domains import Count, Momentum, NonNegative, Positive
from distillctl.methods.shared import (BackboneWithHead, CropParams, TeacherFeature, crop_view, require_setup, require_student,
                                       shuffled_forward, teacher_target)


class DisCoParams(CropParams):
    queue_size: Count = 65536
    temperature: Positive = 0.2
    momentum: Momentum = 0.999  # EMA "mean student" key encoder
    hidden_dim: Count = 2048  # the widened MLP hidden layer that removes the "distilling bottleneck"
    teacher_feature: TeacherFeature = "auto"  # published: the teacher's MoCo projection (128-d)
    only_mse: bool = False  # --only-mse: drop the InfoNCE term
    moco_weight: NonNegative = 1.0
    mse_weight: NonNegative = 1.0
    # The official code sums over its per-GPU batch (32 = 256 / 8 GPUs) and dims. "published" reproduces that
    # scale whatever the world size or batch (32 · batch mean); "sum" sums over this rank's batch; "mean" averages.
    mse_reduction: Literal["published", "sum", "mean"] = "published"
    teacher_bn: Literal["eval", "train"] = "train"  # DisCo/main.py never calls teacher.eval()
    shuffle_bn: bool = True  # shuffle the key encoder's batch across ranks (MoCo); no-op on one process
    augmentation: Literal["mocov2", "simclr", "weak"] = "mocov2"


PUBLISHED_PER_GPU_BATCH = 32  # DisCo-pytorch: batch 256 on 8 GPUs, loss summed per GPU


def embedding_squared_error(student: torch.Tensor, teacher: torch.Tensor, reduction: str) -> torch.Tensor:
    """Σ_dim (s − t)², then summed over the batch, averaged, or 32 × averaged ("published")."""
    per_sample = ((student - teacher) ** 2).sum(dim=1)
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean() * (PUBLISHED_PER_GPU_BATCH if reduction == "published" else 1)


@register
class DisCo(Method):
    name = "disco"
    queue_negatives = True
    title = "DisCo: Remedy self-supervised learning on lightweight models with distilled contrastive learning (Gao et al., ECCV 2022)"
    objective = (
        "The student keeps MoCo v2 as its own task and also regresses the teacher's final embedding on both views. "
        "q_v = n(g(S(x_v))) with g = Linear(d,2048)–ReLU–Linear(2048,D) (the widened hidden layer), k2 = n(g_ema(S_ema(x2))) "
        "from an EMA 'mean student' (m=0.999), t_v = n(T(x_v)) the teacher's projection. L = InfoNCE(q1, k2, Q; τ=0.2) "
        "+ Σ_batch Σ_dim ((q1−t1)² + (q2−t2)²) summed over the official per-GPU batch of 32 (kept at that scale "
        "whatever the batch), queue Q of K=65536 student keys. only_mse drops the InfoNCE term. "
        "The official code leaves the teacher's BatchNorm in train mode (teacher_bn=train)."
    )
    published = (
        "ImageNet linear (Yuting-Gao/DisCo-pytorch; BINGO's table): R50 MoCo-v2 200ep (67.4) → ResNet-18 60.6, "
        "ResNet-34 62.5; R152 → R18 65.5, R34 68.1; R50×2 SwAV → EfficientNet-B0 69.1, MobileNetV3-L 58.9. "
        "MoCo-v2 alone: R18 52.5, EfficientNet-B0 42.2. Recipe: SGD lr 0.03, batch 256, wd 1e-4, cosine, 200 epochs."
    )
    Params = DisCoParams

    def __init__(self, params: DisCoParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.target_key, target_dim = teacher_target(self.name, teacher_dims, params.teacher_feature)
        self.head = mlp_relu([student_dim, params.hidden_dim, target_dim])
        self.queue = None if params.only_mse else FeatureQueue(params.queue_size, target_dim)
        self.key_encoder: EMA | None = None

    def setup(self, student: nn.Module) -> None:
        if not self.params.only_mse:
            self.key_encoder = EMA(BackboneWithHead(student, self.head))

    def requirements(self, image_size: int) -> Requirements:
        view = MethodView(crop_view(self.params, image_size, self.params.augmentation))
        # Train-mode teacher BN makes targets depend on the batch, so a cache can only approximate them.
        mode = "cached_exact" if self.params.teacher_bn == "eval" else "cached_approx"
        return Requirements(views=(view, view), teacher_outputs=frozenset({self.target_key}), teacher_mode=mode,
                            teacher_bn=self.params.teacher_bn)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        queries = [F.normalize(self.head(f), dim=1) for f in inputs.student_features]
        targets = [F.normalize(out[self.target_key].to(queries[0].dtype), dim=1) for out in inputs.teacher_outputs]
        mse = sum(embedding_squared_error(q, t, self.params.mse_reduction) for q, t in zip(queries, targets))
        logs = {"mse": mse.detach(), "cos": sum((q * t).sum(1).mean() for q, t in zip(queries, targets)).detach() / 2}
        if self.params.only_mse:
            return self.params.mse_weight * mse, logs
        encoder = require_setup(self.key_encoder, self.name)
        with torch.no_grad():
            raw_keys = (shuffled_forward(encoder, inputs.images[1], inputs.step) if self.params.shuffle_bn
                        else encoder(inputs.images[1]))
        keys = F.normalize(raw_keys, dim=1).to(queries[0].dtype)
        inputs.extras["disco_keys"] = keys.detach()
        moco = info_nce(queries[0], keys, self.queue.data.to(queries[0].dtype), self.params.temperature)
        logs["moco"] = moco.detach()
        return self.params.moco_weight * moco + self.params.mse_weight * mse, logs

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        if self.params.only_mse:
            return
        student = require_student(inputs.student, self.name)
        self.key_encoder.update(BackboneWithHead(student, self.head), self.params.momentum)
        self.queue.enqueue(inputs.extras["disco_keys"].float())
