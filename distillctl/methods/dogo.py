"""DoGo, "Distill on the Go" (Bhat, Arani, Zonooz; CVPR-W 2021, arXiv 2104.09866): online mutual learning.

Two networks start from scratch and train together: the deployable student and a (usually larger) peer, which
is the run's co-trained teacher (``teacher.source: scratch`` + ``teacher.arch``, or any checkpoint to start
from). Each learns by its own SimCLR loss and, in addition, matches the peer's distribution of cross-view
similarities: for a batch of B images seen in views x and y, P = softmax_row(cos(z_x, z_y) / τ) is a B × B
matrix, and each network minimises KL(P_peer ‖ P_own) with the peer detached. The two objectives touch disjoint
parameters, so their sum is optimised in one step (the official code's two Adam optimisers are two parameter
groups of one; Adam is per-parameter, so nothing changes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, register
from distillctl.methods.domains import Count, CropScale, NonNegative, Positive
from distillctl.methods.shared import CropParams, at_least_float32, crop_view
from distillctl.methods.simclr import nt_xent


class DoGoParams(CropParams):
    crop_scale: CropScale = (0.08, 1.0)  # SimCLRTransform: RandomResizedCrop with the default scale
    temperature: Positive = 0.5  # NT-Xent τ (criterion/ntxent.py)
    kl_temperature: Positive = 0.1  # τ of the cross-view similarity softmax (config/template.yaml KL_temperature)
    # weights of the KL term (config/template.yaml criterion_weight [1, 1, 100, 1]: model 1 = the student)
    student_kl_weight: NonNegative = 100.0
    teacher_kl_weight: NonNegative = 1.0
    hidden_dim: Count = 512  # projection Linear(d, 512, bias=False)–BN–ReLU–Linear(512, 128)
    projection_dim: Count = 128  # n_proj
    # False (official): each network draws its own pair of views of the batch (inputs[0] / inputs[1]);
    # True: both networks see the same two tensors
    shared_views: bool = False


def simclr_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """DoGo's projection head: Linear(in, hidden, no bias)–BN–ReLU–Linear(hidden, out)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def cross_view_log_probs(z_x: torch.Tensor, z_y: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax_row(cos(z_x[i], z_y[j]) / τ): row i is anchor i of view x against every view-y embedding."""
    z_x, z_y = F.normalize(at_least_float32(z_x), dim=1), F.normalize(at_least_float32(z_y), dim=1)
    return F.log_softmax(z_x @ z_y.t() / temperature, dim=1)


def mutual_kl(own_log_probs: torch.Tensor, peer_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(P_peer ‖ P_own) summed over the B × B entries and divided by B² (``F.kl_div``'s default "mean"
    reduction, as the official code uses), the peer detached."""
    peer = peer_log_probs.detach()
    return (peer.exp() * (peer - own_log_probs)).mean()


def dogo_losses(student: tuple[torch.Tensor, torch.Tensor], teacher: tuple[torch.Tensor, torch.Tensor],
                temperature: float, kl_temperature: float) -> dict[str, torch.Tensor]:
    """The four terms for projections ``(z_x, z_y)`` of each network: its NT-Xent and its KL to the peer."""
    log_p_student = cross_view_log_probs(*student, kl_temperature)
    log_p_teacher = cross_view_log_probs(*teacher, kl_temperature)
    return {"ssl_s": nt_xent(*student, temperature), "ssl_t": nt_xent(*teacher, temperature),
            "kl_s": mutual_kl(log_p_student, log_p_teacher), "kl_t": mutual_kl(log_p_teacher, log_p_student)}


@register
class DoGo(Method):
    name = "dogo"
    title = "DoGo: Distill on the Go, online knowledge distillation in self-supervised learning (CVPR-W 2021)"
    objective = (
        "Student S and peer T (the co-trained teacher, from scratch) each with a projection g = Linear(d,512,no "
        "bias)–BN–ReLU–Linear(512,128). Per network m on its views x, y: L_m = NT-Xent(g_m(m(x)), g_m(m(y)); τ=0.5) "
        "+ λ_m · KL(P_peer ‖ P_m), P = softmax_row(cos(z_x, z_y)/0.1) (B × B), KL averaged over all B² entries, the "
        "peer detached. L = L_S + L_T with λ_S = 100, λ_T = 1; both networks (and both heads) are optimised. The "
        "student is deployed; the teacher is written beside it (teacher_cotrained.safetensors)."
    )
    published = (
        "Reported on CIFAR-10/100, STL-10 and Tiny-ImageNet (ResNet-18 with ResNet-50/WRN peers), with gains largest "
        "under label noise and few labels [abstract; table values not retrieved]. Official setting: ResNet-18 at 32 "
        "px, Adam lr 3e-4, weight decay 1e-6, batch 256, 1000 epochs, projection 128."
    )
    sources = (
        "Official code read: NeurAI-Lab/DoGo @ 906ac6238f41 (criterion/kl.py, criterion/ntxent.py, models/simclr.py, "
        "util/train_util.py, config/template.yaml; config/simclr.yaml @ a5c0c3b52ef3). The paper does not name the "
        "repository (found by its README). Checked on identical float64 tensors in a scratch harness (B ∈ {2, 5, "
        "16}, D ∈ {8, 16, 32, 128}, identical views included): NT-Xent, both KL terms and the gradients w.r.t. both "
        "networks' projections agree with the official KLLoss / NTXent to ≤ 6e-13 relative (tolerance 1e-6; the "
        "largest gap is a KL of 1e-5 with identical views); the gradients of both projection heads' parameters "
        "through one combined step agree to ≤ 1e-15. DoGo has no state to update."
    )
    assumptions = (
        "Which network is which: the official template's criterion_weight [1, 1, 100, 1] weights model 1's KL by "
        "100 and model 2's by 1; the student is taken to be model 1 (student_kl_weight 100, teacher_kl_weight 1). "
        "The paper's λ is not retrieved.",
        "SSL loss: SimCLR for both networks (the template's second model uses SimSiam; the CIFAR-10 config and the "
        "paper's main setting use SimCLR).",
        "Views: as in util/train_util.py, each network draws its own pair of views of the batch (shared_views: "
        "true shows both the same tensors); the KL compares the similarity matrices of the same B images.",
        "Augmentation: the 'simclr' view family (jitter strength 1, p 0.8; grayscale 0.2) includes blur with p 0.5; "
        "the official 32-px transform has no blur (it adds it at 224 px only).",
        "Optimiser: one optimiser with the teacher in its own group replaces the two Adam optimisers (identical for "
        "Adam); the published recipe uses AdamW with weight decay 1e-6, the closest optimiser distillctl offers "
        "(decoupled decay of 1e-6 · lr per step against Adam's L2 of 1e-6: both negligible).",
        "The peer's projection head lives in the method (heads.safetensors, teacher_head.*) and trains in the "
        "student's optimiser group; the teacher group (teacher_lr_scale 1) holds the peer backbone.",
        "Teacher BatchNorm runs in train mode (both networks train); under DDP the KL is computed on each rank's "
        "batch and NT-Xent takes the other ranks' embeddings as extra negatives (the official code is single-node).",
        "Cache: none; the teacher trains with the student, so it is online by construction.",
    )
    Params = DoGoParams

    def __init__(self, params: DoGoParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        if teacher_dims is None:
            from distillctl.errors import UsageError

            raise UsageError("dogo trains a peer with the student; give it one",
                             hint="--teacher scratch --teacher-arch resnet18")
        self.student_head = simclr_projector(student_dim, params.hidden_dim, params.projection_dim)
        self.teacher_head = simclr_projector(teacher_dims.pooled, params.hidden_dim, params.projection_dim)

    def requirements(self, image_size: int) -> Requirements:
        view = crop_view(self.params, image_size, "simclr")
        if self.params.shared_views:
            views = (MethodView(view), MethodView(view))
        else:
            views = (MethodView(view, teacher=False), MethodView(view, teacher=False),
                     MethodView(view, student=False), MethodView(view, student=False))
        return Requirements(views=views, teacher_outputs=frozenset({"pooled"}), teacher_mode="co_trained",
                            teacher_bn="train")

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        student = tuple(self.student_head(f) for f in inputs.student_features[:2])
        teacher_views = [out for out in inputs.teacher_outputs if out is not None][:2]
        teacher = tuple(self.teacher_head(out["pooled"].to(student[0].dtype)) for out in teacher_views)
        terms = dogo_losses(student, teacher, self.params.temperature, self.params.kl_temperature)
        loss = (terms["ssl_s"] + self.params.student_kl_weight * terms["kl_s"]
                + terms["ssl_t"] + self.params.teacher_kl_weight * terms["kl_t"])
        return loss, {key: value.detach() for key, value in terms.items()}
