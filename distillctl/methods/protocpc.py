"""ProtoCPC (Lee et al., ICLR 2022): prototypical contrastive predictive coding, used here for self-supervised
compression (teacher → student).

A CPC/InfoNCE bound whose critic is the cross-entropy between the teacher's and the student's distributions over
K shared prototypes. Worked through, the loss is a KD cross-entropy plus a log-partition term in which each
prototype is weighted by a prior: L = −Σ_k P_T[k]·z[k] + log Σ_k π[k]·exp(z[k]). The prior (an EMA of the
teacher's prototype usage) is what prevents collapse, without a queue of negatives.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, register
from distillctl.methods.dino import DINOHead, DINOParams
from distillctl.methods.shared import (CropParams, TeacherFeature, at_least_float32, crop_view, float32_similarity,
                                       teacher_target)
from distillctl._infra import all_reduce_mean


class ProtoCPCParams(CropParams):
    out_dim: int = Field(65536, ge=2)  # K prototypes
    hidden_dim: int = Field(2048, ge=1)  # DINO head MLP width
    use_bn_in_head: bool = False  # DINO's default head
    student_temperature: float = Field(0.1, gt=0)
    teacher_temperature: float = Field(0.04, gt=0)
    prior_momentum: float = Field(0.9, ge=0, lt=1)  # EMA of the batch-mean teacher distribution
    teacher_feature: TeacherFeature = "auto"  # auto: the projection when the teacher has one
    augmentation: Literal["mocov2", "simclr", "weak"] = "mocov2"


def protocpc_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """mean_b( −Σ_k P_T[b,k]·z[b,k] + log Σ_k π[k]·exp(z[b,k]) ), z = student logits already divided by τ_S,
    π the prior rescaled to mean 1 (a uniform prior makes this the plain KD cross-entropy)."""
    cross = -(teacher_probs * student_logits).sum(dim=1)
    partition = torch.logsumexp(student_logits + torch.log(prior), dim=1)
    return (cross + partition).mean()


def prototype_weight(head: DINOHead) -> torch.Tensor:
    """The weight-normalised prototype matrix (K × D) of a DINO head: g · v/‖v‖."""
    return head.prototype_scale * F.normalize(head.prototype_direction, dim=1)


@register
class ProtoCPC(Method):
    name = "protocpc"
    # K = 65,536 prototypes for ImageNet's 1.28 M images (about 20 images each): method.preset=auto keeps the images
    # per prototype on the user's data (presets.derive_per_dataset). On the benchmark's 10,000 images at 120,000
    # images seen: 65,536 → 34.85 % kNN (28 img/s), 1,024 → 40.15, 512 (auto) → 40.55 (benchmarks/RESULTS.md).
    per_dataset_counts = ("out_dim",)
    title = "ProtoCPC: Prototypical contrastive predictive coding, self-supervised compression (Lee et al., ICLR 2022)"
    objective = (
        "Teacher and student see the same augmented view. Student: z = n(h(S(x)))·Wᵀ/τ_S with h a DINO head MLP "
        "(3 layers, GELU) into the teacher's space and W the K = 65536 weight-normalised prototypes; teacher: "
        "P_T = softmax(n(T(x))·sg(W)ᵀ/τ_T) with the same prototypes copied (no gradient on the teacher side); "
        "τ_S = 0.1, τ_T = 0.04. L = mean_b(−Σ_k P_T[k]·z[k] + log Σ_k π[k]·exp(z[k])), π = EMA (0.9) of the "
        "batch-mean P_T rescaled to mean 1 (uniform at the start, where L is the plain KD cross-entropy)."
    )
    published = (
        "The paper reports self-supervised compression from ResNet-50 into ResNet-18 / MobileNetV2 / EfficientNet-B0 "
        "above SEED and CompRess (abstract); per-table values, epochs and views not retrieved."
    )
    sources = (
        "No official code found. The loss form (KD cross-entropy + prior-weighted log-partition, EMA 0.9 prior "
        "rescaled to mean 1, τ_T 0.04, τ_S 0.1, K 65536) follows a third-party reimplementation in the code index "
        "(.../loss/ProtoCPC.py, class protocpc_loss; its repository could not be resolved), described in "
        "docs/methods.md §4. Checked against that file on identical float64 tensors (scratch harness, one process, "
        "B ∈ {2, 7, 16}, K ∈ {5, 64, 1024}, 4 steps): the loss, its gradient w.r.t. the student logits and the "
        "prior after each update agree to ≤ 4.3e-16 relative (tolerance 1e-6). That file holds only the loss; the "
        "head and the teacher-side handling below are not checked against anything, nor is any of it against the "
        "paper's text."
    )
    assumptions = (
        "Teacher head: the teacher's own projection (n(T(x)), the cache's stored output) feeds the copied "
        "prototypes, with no trainable teacher-side head (our recollection of the paper; unverified). The student "
        "head's bottleneck is therefore the teacher target's dim.",
        "Prototype copy: the teacher uses the student's current prototypes detached (copied each step), not an EMA.",
        "Prior update order: the loss uses the prior from before the step; after the optimizer step the prior "
        "takes the batch-mean P_T (all-reduced under DDP), like DINO's centre. It starts uniform (1/K, i.e. π = 1).",
        "Head: DINO's default (3-layer MLP, hidden 2048, GELU, no BN, L2-normalised bottleneck, weight-normalised "
        "prototypes with fixed norm); no last-layer freezing in the first epoch (not mentioned for ProtoCPC).",
        "Views: one MoCo-v2 view shared by teacher and student (as SEED/CompRess, the baselines it is compared "
        "with), so cached targets are exact (cached_exact); the paper's view count is unverified.",
        "No student-side SSL term (self-supervised compression setting, from memory of the paper).",
    )
    Params = ProtoCPCParams

    def __init__(self, params: ProtoCPCParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.target_key, target_dim = teacher_target(self.name, teacher_dims, params.teacher_feature)
        # the bottleneck is the teacher target's space: the teacher embedding meets the same prototypes
        head_params = DINOParams(out_dim=params.out_dim, hidden_dim=params.hidden_dim, bottleneck_dim=target_dim,
                                 use_bn_in_head=params.use_bn_in_head, norm_last_layer=True)
        self.head = DINOHead(student_dim, head_params)
        # π: the EMA of the batch-mean teacher distribution rescaled to mean 1 (kept rescaled: both sum to K)
        self.register_buffer("prior", torch.ones(params.out_dim))

    def requirements(self, image_size: int) -> Requirements:
        view = crop_view(self.params, image_size, self.params.augmentation)
        return Requirements(views=(MethodView(view),), teacher_outputs=frozenset({self.target_key}),
                            teacher_mode="cached_exact")

    def teacher_probs(self, teacher: torch.Tensor) -> torch.Tensor:
        weight = prototype_weight(self.head).detach()
        logits = float32_similarity(F.normalize(at_least_float32(teacher), dim=1), weight)
        return F.softmax(logits / self.params.teacher_temperature, dim=1)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        params = self.params
        student_logits = self.head(inputs.student_features[0]) / params.student_temperature
        probs = self.teacher_probs(inputs.teacher_outputs[0][self.target_key]).to(student_logits.dtype)
        inputs.extras["protocpc_teacher_probs"] = probs.detach()  # per sample: micro-batches concatenate
        loss = protocpc_loss(student_logits, probs, self.prior.to(student_logits.dtype))
        usage = self.prior / params.out_dim
        entropy = -(usage * torch.log(usage.clamp_min(1e-30))).sum()
        return loss, {"prior_perplexity": entropy.exp().double() / params.out_dim}  # 1 = uniform usage

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        # P_T as the loss saw it (the prototypes before this optimizer step)
        batch_probs = all_reduce_mean(inputs.extras["protocpc_teacher_probs"].to(self.prior.dtype).mean(dim=0))
        momentum = self.params.prior_momentum
        self.prior.mul_(momentum).add_(batch_probs * self.params.out_dim, alpha=1 - momentum)

