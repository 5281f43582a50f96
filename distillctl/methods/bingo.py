"""BINGO (Xu et al., ICLR 2022): contrast the student against the teacher's embeddings of kNN "bags".

Stage 0 (offline): the teacher's L2-normalised pooled features of centre crops give each image k=5
nearest neighbours (:func:`build_bag_table`). Training: for sample i one neighbour j is drawn from
its bag (:func:`draw_neighbours`); the method declares two views of j as :class:`NeighbourView`
and the trainer fills them with j's pixels. The CutMix of the two query views is made and encoded
inside ``loss`` (one extra student forward), so no trainer support is needed for it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, register
from distillctl.methods.common import FeatureQueue, info_nce, mlp_relu
from distillctl.methods.domains import Count, NonNegative, Positive, WeightPair
from distillctl.methods.shared import (CropParams, NeighbourView, TeacherFeature, crop_view, cutmix, knn_bags, require_student,
                                       sample_cutmix_box, step_rng, teacher_target)



class BingoParams(CropParams):
    queue_size: Count = 65536
    temperature: Positive = 0.2  # 0.12 in the SwAV-R50×2 → EfficientNet-B0 script
    bag_size: Count = 5  # k nearest neighbours per image, itself excluded (read by the trainer to build the bags)
    hidden_dim: Count = 2048
    mix_alpha: Positive = 2.0  # CutMix λ ~ Beta(α, α)
    bag_weights: WeightPair = (0.5, 0.5)  # (a, b) for (own key, neighbour key) after the warm-up
    # (a, b) = (1, 0) while the fractional epoch is below this: the official `if epoch > 10` (epochs from 0) keeps
    # them for the first 11 epochs; the auto preset scales it to the run
    bag_warmup_epochs: NonNegative = 11
    teacher_feature: TeacherFeature = "auto"  # published: the MoCo teacher's projection (128-d)
    teacher_bn: Literal["eval", "train"] = "train"  # official: the model is never put in eval()
    augmentation: Literal["mocov2", "simclr", "weak"] = "mocov2"


def build_bag_table(centre_features: torch.Tensor, k: int = 5) -> torch.Tensor:
    """(N, k) neighbour indices from the teacher's pooled centre-crop features (BINGO stage 0)."""
    return knn_bags(centre_features, k)


def draw_neighbours(bags: torch.Tensor, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The neighbour each sample shows this epoch: uniform over its bag, keyed by (seed, epoch, index)
    so it is independent of batch layout, workers and resume (the trainer hook for NeighbourView)."""
    from distillctl.data.views import draw_neighbour

    return torch.tensor([draw_neighbour(bags, int(i), seed, epoch) for i in index.tolist()], dtype=torch.long)


def bingo_loss(student_i: torch.Tensor, student_j: torch.Tensor, student_mix: torch.Tensor, teacher_i: torch.Tensor,
               teacher_j: torch.Tensor, queue: torch.Tensor, temperature: float, weights: tuple[float, float],
               mix_lambda: float) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """(L_i + L_j + L_m)/3 with ℓ(u, p) = InfoNCE over [u·p, u·Q]/τ (all inputs L2-normalised):
    L_i = a·ℓ(s_i,t_i) + b·ℓ(s_i,t_j), L_j = a·ℓ(s_j,t_j) + b·ℓ(s_j,t_i), L_m = λ·ℓ(s_m,t_i) + (1−λ)·ℓ(s_m,t_j)."""
    a, b = weights

    def term(u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return info_nce(u, p, queue, temperature)

    anchor = a * term(student_i, teacher_i) + (b * term(student_i, teacher_j) if b else 0.0)
    neighbour = a * term(student_j, teacher_j) + (b * term(student_j, teacher_i) if b else 0.0)
    mix = mix_lambda * term(student_mix, teacher_i) + (1 - mix_lambda) * term(student_mix, teacher_j)
    logs = {"anchor": anchor.detach(), "neighbour": neighbour.detach(), "mix": mix.detach()}
    return (anchor + neighbour + mix) / 3, logs


@register
class Bingo(Method):
    name = "bingo"
    queue_negatives = True
    title = "BINGO: Bag of instances aggregation boosts self-supervised distillation (Xu et al., ICLR 2022)"
    objective = (
        "Offline, the teacher's pooled centre-crop features give each image a bag of its k=5 nearest neighbours. "
        "Per sample i a neighbour j is drawn; queries q_i, q_j and keys k_i, k_j are independent MoCo-v2 views, "
        "m = CutMix(q_i, q_j) with λ ~ Beta(2,2) corrected to the pasted area. s = n(g(S(·))) with g = "
        "Linear(d,2048)–ReLU–Linear(2048,D); t_i, t_j = n(T(k_i)), n(T(k_j)) (teacher projection). With "
        "ℓ(u,p) = −log softmax([u·p, u·Q]/τ)[0] over a queue Q of teacher keys t_i (K=65536, τ=0.2): "
        "L = ⅓[a·ℓ(s_i,t_i) + b·ℓ(s_i,t_j) + a·ℓ(s_j,t_j) + b·ℓ(s_j,t_i) + λ·ℓ(s_m,t_i) + (1−λ)·ℓ(s_m,t_j)], "
        "(a,b) = (1,0) for the first 11 epochs (official `epoch > 10`), then (0.5,0.5). Teacher BatchNorm runs in train mode in the official code."
    )
    published = (
        "ImageNet linear (haohang96/bingo): R50 MoCo-v2 200ep (67.4) → ResNet-18 61.4, ResNet-34 63.5; R50 800ep "
        "(71.1) → R18 64.0, R34 66.1; R152 → R18 65.9, R34 69.1; R50×2 SwAV → R18 65.5, R34 68.9, EfficientNet-B0 "
        "69.3, MobileNetV3-L 67.1 (MoCo-v2 alone: R18 52.5, R34 57.4). Recipe: SGD lr 0.03, batch 256, wd 1e-4, "
        "cosine, 200 epochs."
    )
    Params = BingoParams

    def __init__(self, params: BingoParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.target_key, target_dim = teacher_target(self.name, teacher_dims, params.teacher_feature)
        self.head = mlp_relu([student_dim, params.hidden_dim, target_dim])
        self.queue = FeatureQueue(params.queue_size, target_dim)

    def requirements(self, image_size: int) -> Requirements:
        spec = crop_view(self.params, image_size, self.params.augmentation)
        views = (MethodView(spec, teacher=False), MethodView(spec, student=False),  # q_i, k_i
                 NeighbourView(spec, teacher=False), NeighbourView(spec, student=False))  # q_j, k_j
        return Requirements(views=views, teacher_outputs=frozenset({self.target_key}), teacher_mode="cached_approx",
                            teacher_bn=self.params.teacher_bn, needs_index=True)

    def bag_weights(self, epoch: float) -> tuple[float, float]:
        return (1.0, 0.0) if epoch < self.params.bag_warmup_epochs else tuple(self.params.bag_weights)

    def mix_views(self, query_i: torch.Tensor, query_j: torch.Tensor, step: int) -> tuple[torch.Tensor, float]:
        """One CutMix box and λ per step (as the official per-batch CutMix), replayable from the step."""
        rng: np.random.Generator = step_rng(step, salt=0xB1)
        lam = float(rng.beta(self.params.mix_alpha, self.params.mix_alpha))
        box = sample_cutmix_box(query_i.shape[-2], query_i.shape[-1], lam, rng)
        return cutmix(query_i, query_j, box)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        feature_i, feature_j = inputs.student_features
        mixed, lam = self.mix_views(inputs.images[0], inputs.images[2], inputs.step)
        feature_mix = require_student(inputs.student, self.name)(mixed)
        s_i, s_j, s_m = (F.normalize(self.head(f), dim=1) for f in (feature_i, feature_j, feature_mix))
        t_i, t_j = (F.normalize(inputs.teacher_outputs[slot][self.target_key].to(s_i.dtype), dim=1) for slot in (1, 3))
        queue = self.queue.data.to(s_i.dtype)
        loss, logs = bingo_loss(s_i, s_j, s_m, t_i, t_j, queue, self.params.temperature,
                                self.bag_weights(inputs.epoch), lam)
        logs["mix_lambda"] = lam
        return loss, logs

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        self.queue.enqueue(F.normalize(inputs.teacher_outputs[1][self.target_key].float(), dim=1))
