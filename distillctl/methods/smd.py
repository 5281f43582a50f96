"""SMD (Liu et al., ECCV 2022): hard-aware metric distillation of the teacher's distance structure."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, register
from distillctl.methods.collapse import LOG_KEY, embedding_cosine
from distillctl.methods.domains import NonNegative, Positive
from distillctl.methods.shared import CropParams, at_least_float32, crop_view, teacher_target

# liuhao-lh/SMD main_distill.py switches τ to 0.004 for exactly these students (timm names).
_SMALL_TAU_ARCHS = ("mobilenetv3_large", "efficientnet_b0", "efficientnet_b1")


class SMDParams(CropParams):
    temperature: Positive | None = None  # None: 0.004 for MobileNetV3-L / EfficientNet-B0/B1 students, else 0.04
    times: NonNegative = 1.0  # scale of the SMD term; as in the official loop it applies during the warm-up epochs only
    warmup_epochs: NonNegative = 2  # epochs (fractional: the auto preset) with the extra −½(cos(t1,s1)+cos(t2,s2)) term
    teacher_feature: Literal["backbone", "projection"] = "backbone"  # published: pooled R50 feature, head removed
    teacher_bn: Literal["eval", "train"] = "eval"  # official: teacher_model.eval()
    augmentation: Literal["mocov2", "simclr", "weak"] = "mocov2"
    # none: the paper's loss. batch: subtract each view's batch mean from the teacher targets and from the student's
    # head outputs before they are L2-normalised (warm-up cosine and metric term alike; per process under DDP, as
    # the loss itself). The pooled teacher feature is post-ReLU, so every target shares one mean direction; on the
    # benchmark the student's head settled on it by step 20 and stayed (benchmarks/RESULTS.md, smd rows)
    center: Literal["none", "batch"] = "none"


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> torch.Tensor:
    """Euclidean distances ||a_i − b_j||; the squared distance is clamped at ``floor`` before the square
    root so the gradient stays finite at 0 (as in the official code)."""
    squared = (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2 * a @ b.t()
    return squared.clamp(min=floor).sqrt()


def smd_loss(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """mean_i softplus((w_p·Dts[i,p] − w_a·Dts[i,a]) / τ) over one view (inputs are L2-normalised here).

    Negatives of anchor i: {j : Dtt[i,j] > Dts[i,i]}; a = the closest negative, p = the farthest
    positive (j = i is always positive); w_a = max(0, Dtt[i,a] − Dts[i,a]), w_p = max(0, Dts[i,p] −
    Dtt[i,p]), both without gradient. An anchor without negatives keeps only its positive term
    (the official code's 1e5 fill gives w_a = 0 there)."""
    with torch.autocast(device_type=student.device.type, enabled=False):  # τ = 0.004: keep distances in fp32
        return _smd_loss(at_least_float32(teacher.detach()), at_least_float32(student), temperature)


def _smd_loss(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    teacher = F.normalize(teacher.to(dtype), dim=1)
    student = F.normalize(student.to(dtype), dim=1)
    with torch.no_grad():  # the official floor 1e-12 here too: Dtt[i,i] = 1e-6, as in liuhao-lh/SMD
        teacher_dist = pairwise_distance(teacher, teacher)
    cross_dist = pairwise_distance(teacher, student)
    negative = teacher_dist > cross_dist.diagonal().detach().unsqueeze(1)
    has_negative = negative.any(dim=1)
    negative_dist, negative_index = cross_dist.masked_fill(~negative, 1e5).min(dim=1)
    positive_dist, positive_index = cross_dist.masked_fill(negative, -1.0).max(dim=1)
    teacher_at_negative = teacher_dist.gather(1, negative_index.unsqueeze(1)).squeeze(1)
    teacher_at_positive = teacher_dist.gather(1, positive_index.unsqueeze(1)).squeeze(1)
    weight_negative = (teacher_at_negative - negative_dist.detach()).clamp(min=0)
    weight_positive = (positive_dist.detach() - teacher_at_positive).clamp(min=0)
    negative_term = torch.where(has_negative, weight_negative * negative_dist, torch.zeros_like(negative_dist))
    loss = F.softplus((weight_positive * positive_dist - negative_term) / temperature).mean()
    stats = {"no_negative_frac": (~has_negative).float().mean().double(),  # float64: averaged over views exactly
             "violating_frac": ((weight_positive > 0) | (weight_negative > 0)).float().mean().double()}
    return loss, stats


def _cosine(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """mean_i cos(t_i, s_i) in (at least) fp32 whatever the autocast state (the warm-up term)."""
    with torch.autocast(device_type=student.device.type, enabled=False):
        dtype = torch.promote_types(at_least_float32(student).dtype, teacher.dtype)
        return F.cosine_similarity(teacher.to(dtype), student.to(dtype), dim=1).mean()


def _centred(features: torch.Tensor) -> torch.Tensor:
    """``features`` minus their batch mean (rows are images)."""
    return features - features.mean(dim=0, keepdim=True)


@register
class SMD(Method):
    name = "smd"
    title = "SMD: Improving self-supervised lightweight model learning via hard-aware metric distillation (Liu et al., ECCV 2022)"
    objective = (
        "The student learns the teacher's metric structure. Per view, t_i = n(T(x_i)) (pooled backbone) and "
        "s_j = n(W·S(x_j)) with a Linear(d_s→d_T). With Dtt/Dts the teacher–teacher and teacher–student "
        "distances, anchor i's negatives are {j : Dtt[i,j] > Dts[i,i]}; the hardest negative a (closest) and "
        "hardest positive p (farthest) are weighted by how badly the student violates the teacher "
        "(w_a = [Dtt−Dts]_+ at a, w_p = [Dts−Dtt]_+ at p, no gradient): ℓ_i = softplus((w_p·Dts[i,p] − "
        "w_a·Dts[i,a])/τ), averaged over anchors and the two views. τ = 0.04 (0.004 for MobileNetV3-L and "
        "EfficientNet-B0/B1 students); during the first 2 epochs −½(cos(t1,s1)+cos(t2,s2)) is added. "
        "No queue, momentum encoder or predictor. method.params.center=batch (not in the paper) subtracts each "
        "view's batch mean from targets and head outputs first: the pooled post-ReLU teacher feature shares one mean "
        "direction, onto which the benchmark's student heads collapsed by step 20. On runs of at most 1 % of the "
        "paper's images, method.preset=auto uses the settings measured for short runs (methods/presets.py, "
        "_SMD_SHORT_RUN): centred targets, τ 0.4, the warm-up's cosine term alone (times 0) for the first half of "
        "the run, lr 0.4·B/512."
    )
    published = (
        "ECCV 2022 (liuhao-lh/SMD): beats earlier self-supervised distillers with fewer epochs, sometimes the teacher "
        "(abstract); per-architecture table not retrieved. Recipe: SimSiam-100ep R50 teacher, SGD lr 0.05·B/256, "
        "B=512, wd 1e-4, cosine, 100 epochs, two MoCo-v2 views; linear eval with LARS, batch 4096."
    )
    Params = SMDParams

    def __init__(self, params: SMDParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.target_key, target_dim = teacher_target(self.name, teacher_dims, params.teacher_feature)
        self.head = nn.Linear(student_dim, target_dim)
        self.temperature = params.temperature if params.temperature is not None else 0.04

    def setup(self, student: nn.Module) -> None:
        if self.params.temperature is None:
            arch = str(getattr(student, "pretrained_cfg", {}).get("architecture", ""))
            self.temperature = 0.004 if arch.startswith(_SMALL_TAU_ARCHS) else 0.04

    def requirements(self, image_size: int) -> Requirements:
        view = MethodView(crop_view(self.params, image_size, self.params.augmentation))
        return Requirements(views=(view, view), teacher_outputs=frozenset({self.target_key}),
                            teacher_mode="cached_exact", teacher_bn=self.params.teacher_bn)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        students = [self.head(f) for f in inputs.student_features]
        # targets stay in (at least) fp32: a bf16 cast under AMP would round them before the fp32 distances
        teachers = [at_least_float32(out[self.target_key]) for out in inputs.teacher_outputs]
        if self.params.center == "batch":
            teachers, students = [_centred(t) for t in teachers], [_centred(s) for s in students]
        per_view = [smd_loss(t, s, self.temperature) for t, s in zip(teachers, students)]
        distill = sum(loss for loss, _ in per_view) / len(per_view)
        cosine = sum(_cosine(t, s) for t, s in zip(teachers, students)) / len(students)
        # embedding_cos: on the CIFAR-10 protocol every student embedding settles on the teacher's mean direction
        # (benchmarks/RESULTS.md, embedding-geometry table); the collapse watch reports it
        logs = {"smd": distill.detach(), "cos": cosine.detach(), "tau": self.temperature,
                "no_negative_frac": sum(s["no_negative_frac"] for _, s in per_view) / len(per_view),
                LOG_KEY: embedding_cosine(students[0])}
        if inputs.epoch < self.params.warmup_epochs:
            return -cosine + self.params.times * distill, logs
        return distill, logs
