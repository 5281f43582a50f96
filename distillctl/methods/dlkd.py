"""DLKD (Ding et al., TNNLS 2024; arXiv 2012.00573, first titled MLKD): dual-level knowledge distillation.

Every image is shown four times, rotated by 0/90/180/270°, to both networks. Three embedding-level terms on
the pooled features of all 4B copies: *alignment* (the student, through an MLP, regresses the teacher's
direction), *correlation* (how each rotated copy relates to the unrotated images of the batch, a softmax over
the batch, is copied from the teacher by KL) and a contrastive term over linear embeddings of both networks
(SupCon in the paper with class labels; here its label-free form).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillctl.data.views import ViewSpec
from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, register
from distillctl.methods.domains import CropScale
from distillctl.methods.common import mlp
from distillctl.methods.presets import PublishedRecipe
from distillctl.methods.shared import CropParams, TeacherFeature, at_least_float32, teacher_target

ROTATIONS = 4


class DLKDParams(CropParams):
    # CIFAR scripts (run_cifar_mlkd.sh): -a 50 -b 1 -d 20; the ImageNet script uses 20 / 0.5 / 10
    corr_weight: float = Field(50.0, ge=0)  # α
    contrast_weight: float = Field(1.0, ge=0)  # β
    align_weight: float = Field(20.0, ge=0)  # δ
    corr_temperature: float = Field(0.5, gt=0)  # CorrLoss(temperature=0.5)
    contrast_temperature: float = Field(0.07, gt=0)  # SupConLoss(temperature=0.07, base_temperature=0.07)
    embed_dim: int = Field(128, ge=1)  # --feat_dim: the linear embeddings of the contrastive term
    align_hidden_factor: int = Field(16, ge=1)  # the align MLP: d_s → 16·d_t → d_t
    # image: positives are every copy (rotation, network) of the same image, the label-free analogue of the
    # paper's class mask (whose classes span the rotations); pair: only the same copy's other network
    contrast_positives: Literal["image", "pair"] = "image"
    teacher_feature: TeacherFeature = "backbone"  # published: the penultimate pooled feature (feat[-1])
    # RandomCrop(32, padding=4) per rotated copy: ≈ area 0.77–1 of the image
    crop_scale: CropScale = (0.77, 1.0)


def align_loss(predicted: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """2 − 2·mean cos(predicted, teacher) (BYOL's regression of directions)."""
    return 2 - 2 * (F.normalize(predicted, dim=-1) * F.normalize(teacher, dim=-1)).sum(dim=-1).mean()


def rotation_correlation_kl(student: torch.Tensor, teacher: torch.Tensor, batch: int, temperature: float) -> torch.Tensor:
    """Rows are rotation-major (B unrotated, then 3B rotated copies). For each rotated copy, the cosine similarities
    to the B unrotated images form a softmax(/τ) over the batch; KL(teacher ‖ student), summed over the batch and
    divided by the 3B rotated rows ("batchmean"); the teacher side carries no gradient."""
    def similarities(rows: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(rows, dim=1, eps=1e-8)
        return unit[batch:] @ unit[:batch].t()

    log_student = F.log_softmax(similarities(student) / temperature, dim=1)
    log_teacher = F.log_softmax(similarities(teacher.detach()) / temperature, dim=1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1).mean()


def paired_contrastive(student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor,
                       temperature: float, eps: float = 1e-7) -> torch.Tensor:
    """SupCon (Khosla et al.) over the 2N anchors [student; teacher] (L2-normalised): each anchor's log-probability
    of every other anchor (self excluded), averaged over its positives (the other anchors of its group), negated
    and averaged over anchors; the paper's τ/τ_base factor is 1 (both 0.07). As released, the logits are shifted by
    their row maximum and ``eps`` is added to the shifted partition sum, which bounds the loss when every other
    anchor is far away."""
    anchors = torch.cat([student, teacher])
    labels = torch.cat([groups, groups])
    logits = anchors @ anchors.t() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    self_mask = torch.eye(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    partition = logits.exp().masked_fill(self_mask, 0.0).sum(dim=1, keepdim=True)
    log_prob = logits - torch.log(partition + eps)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    positive_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1) / positives.sum(dim=1)
    return -positive_log_prob.mean()


@register
class DLKD(Method):
    name = "dlkd"
    title = "DLKD: Dual-level knowledge distillation via knowledge alignment and correlation (Ding et al., TNNLS 2024)"
    objective = (
        "Each image is shown at 0/90/180/270° to both networks; f_s, f_t = pooled features of all 4B copies. "
        "L = 50·L_corr + 1·L_con + 20·L_align. L_align = 2 − 2·cos(MLP_a(f_s), f_t), MLP_a = d_s → 16·d_t → d_t "
        "(BN, ReLU). L_corr: for each rotated copy, cosine similarities to the B unrotated images, softmax(/0.5) over "
        "the batch; KL(teacher ‖ student) (batch mean), the student through MLP_c = d_s → d_s → d_s (BN, ReLU), the "
        "teacher raw and detached. L_con: SupCon (τ 0.07) over [n(W_s f_s); n(W_t f_t)] (linear to 128), positives "
        "= the other copies of the same image (the paper: of the same class). No CE term (no labels)."
    )
    published = (
        "Supervised CIFAR-100 / ImageNet KD with rotation copies (ifding/DLKD, e.g. resnet32x4 → ShuffleV2, "
        "ResNet-34 → ResNet-18); the paper also reports self-supervised teachers (values not retrieved). CIFAR recipe: "
        "SGD lr 0.05 (0.01 for MobileNet/ShuffleNet), momentum 0.9, wd 5e-4, batch 64, 240 epochs, ×0.1 at "
        "150/180/210; weights γ=1, α=50, β=1, δ=20 (ImageNet script: 1 / 20 / 0.5 / 10)."
    )
    sources = (
        "Official code read: ifding/DLKD @ c7528eb05c2d (2021-06-06), helper/losses.py (AlignLoss, CorrLoss, "
        "SupConLoss, Embed), helper/loops.py (mlkd branch), train_student.py, models/mlp_head.py, dataset/cifar.py, "
        "scripts/run_cifar_mlkd.sh, run_imagenet_mlkd.sh. The official code works at the embedding level only "
        "(feat[-1], the pooled penultimate feature); there is no intermediate-feature form. Checked on identical "
        "float64 tensors (scratch harness, B ∈ {2, 5, 8}, the official interleaved row order vs our rotation-major "
        "order, the official label mask given as image ids, and as identity for contrast_positives=pair): each term, "
        "the total and the gradients w.r.t. the student features and every head parameter agree to ≤ 1.9e-15 "
        "relative (tolerance 1e-6; the biases before each BatchNorm, whose exact gradient is 0, are below 1e-12 in "
        "both), and so do the BatchNorm running statistics of both MLPs after the step. DLKD has no other state."
    )
    assumptions = (
        "Label-free: the CE term (γ) is dropped and SupCon's class mask becomes an instance mask. Its positives are "
        "all copies of the same image (contrast_positives=image, the analogue of the class mask, which spans the four "
        "rotations) or only the same copy's other network (pair, the mask SupCon falls back to without labels).",
        "Views: four weak views (crop area 0.77–1 ≈ RandomCrop(32, padding=4)) rotated by 0–3 quarter turns. "
        "Officially one flip decision is shared by the four copies and each copy gets its own crop; here each copy "
        "draws its own crop and flip.",
        "The four copies go through the student as one 4B batch (grouped forward), so its BatchNorm statistics "
        "cover all rotations as in the official stacked batch; the row order inside the batch differs (rotation-"
        "major instead of image-major), which changes no term.",
        "Cache mode: the teacher sees exactly the student's copies, so a feature cache serves it (cached_exact): "
        "each of the K stored crops is cached at 0/90/180/270° (K·4 rows per image), and every step gives the four "
        "copies of an image four different stored crops, one per rotation. --teacher-mode online draws fresh crops.",
        "Teacher feature: the pooled backbone feature (the release's supervised teachers have no projection); "
        "teacher_feature=projection/auto use a projection head where the teacher has one.",
        "Weights: the CIFAR script's α=50, β=1, δ=20 (the ImageNet script's 20/0.5/10 is the alternative); the "
        "self-supervised-teacher setting is not scripted in the release.",
        "Under DDP the correlation softmax and the contrastive term run over each rank's own batch (published: "
        "one GPU on CIFAR).",
    )
    Params = DLKDParams
    preset_recipe = PublishedRecipe(
        source="DLKD (ifding/DLKD train_student.py, run_cifar_mlkd.sh): SGD lr 0.05, batch 64, 240 epochs on "
               "CIFAR-100 (50,000 images)",
        optimizer="sgd", lr=0.05, batch=64, published_rule="none", auto_rule="none", epochs=240,
        rule_source="the code fixes the lr at batch 64 and states no rule", dataset_images=50_000)

    def __init__(self, params: DLKDParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.target_key, target_dim = teacher_target(self.name, teacher_dims, params.teacher_feature)
        self.align_head = mlp([student_dim, params.align_hidden_factor * target_dim, target_dim])
        self.corr_head = mlp([student_dim, student_dim, student_dim])
        self.embed_student = nn.Linear(student_dim, params.embed_dim)
        self.embed_teacher = nn.Linear(target_dim, params.embed_dim)

    def requirements(self, image_size: int) -> Requirements:
        views = tuple(MethodView(ViewSpec(size=image_size, family="weak", scale=tuple(self.params.crop_scale),
                                          flip=self.params.flip, quarter_turns=turns)) for turns in range(ROTATIONS))
        # one 4B forward, as the official loader stacks the copies: BatchNorm sees all rotations together
        # the teacher sees the student's copies: a cache storing every crop at the four rotations serves it
        return Requirements(views=views, teacher_outputs=frozenset({self.target_key}), grouping="by_resolution")

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        params = self.params
        student = torch.cat(inputs.student_features)  # rotation-major: B copies at 0°, then 90°, 180°, 270°
        teacher = torch.cat([out[self.target_key] for out in inputs.teacher_outputs]).to(student.dtype)
        batch = inputs.student_features[0].shape[0]
        with torch.autocast(device_type=student.device.type, enabled=False):  # heads and similarities in ≥ float32
            student, teacher = at_least_float32(student), at_least_float32(teacher)
            align = align_loss(self.align_head(student), teacher)
            corr = rotation_correlation_kl(self.corr_head(student), teacher, batch, params.corr_temperature)
            image = torch.arange(batch, device=student.device).repeat(ROTATIONS)
            groups = image if params.contrast_positives == "image" else torch.arange(ROTATIONS * batch, device=student.device)
            contrast = paired_contrastive(F.normalize(self.embed_student(student), dim=1),
                                          F.normalize(self.embed_teacher(teacher), dim=1),
                                          groups, params.contrast_temperature)
        loss = params.corr_weight * corr + params.contrast_weight * contrast + params.align_weight * align
        return loss, {"corr": corr.detach(), "contrast": contrast.detach(), "align": align.detach()}
