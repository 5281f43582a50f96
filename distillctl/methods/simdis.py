"""SimDis: "Simple Distillation Baselines for Improving Small Self-supervised Models" (Gu, Liu, Tresp; arXiv
2106.11304). A BYOL student with one predictor per target: its own other view, its EMA network on the same and
the other view, the teacher's online projections and the teacher's EMA projections (same and other view).

Offline (default): a frozen, pre-trained teacher (BatchNorm in train mode, as the official code leaves it).
Online (``online: true``): the teacher is co-trained from scratch (``teacher.source: scratch``) by its own BYOL
loss at the same time (``teacher_mode="co_trained"``); the method then owns the teacher's projector, predictor
and EMA network, and the student's targets come from the live teacher.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import nn

from distillctl.errors import UsageError
from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, TeacherDims, register
from distillctl.methods.common import EMA, cosine_momentum, mlp
from distillctl.methods.domains import Count, CropScale, Momentum
from distillctl.methods.shared import (BackboneWithHead, CropParams, TeacherFeature, crop_view, require_setup,
                                       require_student, teacher_target)

Target = Literal["s_dv", "sema_sv", "sema_dv", "t_sv", "t_dv", "tema_sv", "tema_dv"]
SEVEN_VIEWS: tuple[str, ...] = ("s_dv", "sema_sv", "sema_dv", "t_sv", "t_dv", "tema_sv", "tema_dv")  # "7v"
TWO_VIEWS: tuple[str, ...] = ("sema_dv", "tema_dv")  # "2v"


class SimDisParams(CropParams):
    crop_scale: CropScale = (0.08, 1.0)  # BYOL's RandomResizedCrop
    # one predictor per target: "7v" (README, default) or "2v" = (sema_dv, tema_dv), or any other subset
    predictors: tuple[Target, ...] = SEVEN_VIEWS
    online: bool = False  # true: the teacher trains with the student (co-trained, by its own BYOL loss)
    projector_hidden_dim: Count = 4096
    projection_dim: Count = 256  # low_dim
    predictor_hidden_dim: Count = 4096
    momentum: Momentum = 0.99  # base EMA momentum (student and online teacher), cosine to 1 over the iterations
    teacher_feature: TeacherFeature = "auto"  # offline: the teacher output the t_/tema_ targets are (auto: proj)

    @field_validator("predictors")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("list each predictor once, at least one (7v: s_dv sema_sv sema_dv t_sv t_dv tema_sv "
                             "tema_dv; 2v: sema_dv tema_dv)")
        return value


def byol_pair_loss(p1: torch.Tensor, y1: torch.Tensor, p2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """mean_b(4 − 2(p1·y1 + p2·y2)) for unit-length predictions p and targets y (targets detached)."""
    return (4 - 2 * ((p1 * y1.detach()).sum(dim=1) + (p2 * y2.detach()).sum(dim=1))).mean()


class Predictor(nn.Module):
    """Linear(in, hidden)–BN–ReLU–Linear(hidden, out)–L2 normalisation."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = mlp([in_dim, hidden_dim, out_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=1)


def target_pairs(name: str, own: list[torch.Tensor], own_ema: list[torch.Tensor], teacher: list[torch.Tensor],
                 teacher_ema: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (view-1 target, view-2 target) of one predictor: same view (sv) or the other view (dv)."""
    source = {"s": own, "sema": own_ema, "t": teacher, "tema": teacher_ema}[name.rsplit("_", 1)[0]]
    return (source[0], source[1]) if name.endswith("_sv") else (source[1], source[0])


def simdis_student_loss(predictions: dict[str, tuple[torch.Tensor, torch.Tensor]], own, own_ema, teacher,
                        teacher_ema) -> torch.Tensor:
    """L_S = Σ_predictors pair(p(view1), target1, p(view2), target2) / number of predictors."""
    total = sum(byol_pair_loss(p1, t1, p2, t2) for name, (p1, p2) in predictions.items()
                for t1, t2 in [target_pairs(name, own, own_ema, teacher, teacher_ema)])
    return total / len(predictions)


@register
class SimDis(Method):
    name = "simdis"
    title = "SimDis: Simple distillation baselines for improving small self-supervised models (Gu et al., 2021)"
    objective = (
        "Student S with projector g (Linear(d,4096)–BN–ReLU–Linear(4096,256)) and one predictor q_k (Linear(256,"
        "4096)–BN–ReLU–Linear(4096,·)–L2norm) per target k on two BYOL views x1, x2: own other view (s_dv, "
        "ĝS(x)), own EMA network same/other view (sema_sv/dv), teacher online projection same/other view (t_sv/dv) "
        "and teacher EMA projection same/other view (tema_sv/dv); targets L2-normalised and detached. Per k: "
        "mean_b(4 − 2(q_k(z1)·y1 + q_k(z2)·y2)); L_S = Σ_k / #k. 7v: all seven; 2v: sema_dv + tema_dv. Online: "
        "L = L_S + L_T, L_T the teacher's BYOL loss (its predictor on its projection against its EMA's other view); "
        "EMA momentum 0.99 → 1 on a cosine over the iterations."
    )
    published = (
        "ResNet-50 BYOL teacher → ResNet-18 on ImageNet, 1000 epochs each (LARS, base lr 0.3 per 256, wd 1e-4, "
        "10 warm-up epochs, batch 512 on 8 GPUs): the paper claims the best ResNet-18 SSL result of its time and "
        "notes BYOL ResNet-18 trails supervised by 8.9 points [abstract/intro; table values not retrieved]."
    )
    sources = (
        "Official code read: JindongGu/SimDis @ 0811458a95b2 (SimDis/models/sim_dis_train_model.py, "
        "resnet_mbn.py, exps/arxiv/base_exp_simDis.py; README @ 0687241b72a3). Checked on identical float64 "
        "tensors in a scratch harness (batch 2 and 8, identical views included; the official forward run on the "
        "same tiny backbones with our projector/predictor weights copied in): L_S for 7v and 2v and offline, L_S + "
        "L_T online, the gradients of every trainable parameter (student, heads, predictors, online teacher) and "
        "the EMA networks after 3 optimiser steps (the official updates at the start of the next iteration with "
        "that iteration's momentum; ours after the step with the same momentum) agree: losses to ≤ 2.4e-15, all "
        "gradients to ≤ 1.3e-13 (max difference over max magnitude), EMA parameters to ≤ 9e-14 relative "
        "(tolerance 1e-6)."
    )
    assumptions = (
        "Offline teacher EMA: a distillctl teacher is one network (the pre-trained BYOL checkpoint's EMA copy is not "
        "kept), and a frozen network is its own EMA fixed point, so offline the tema_* targets are the teacher's "
        "projections (as t_*); the predictors stay separate. The official offline run loads both the BYOL online "
        "network and its EMA from the teacher checkpoint.",
        "Offline teacher output: its projection when it has one (BYOL's 256-d), else its pooled feature "
        "(teacher_feature); the t_/tema_ predictors output that width.",
        "Teacher BatchNorm: train mode (the official teacher is never set to eval()); --teacher-bn eval overrides.",
        "Cache: none. The teacher sees exactly the student's two views, but they come from two augmentation "
        "families (byol1/byol2) and its BatchNorm runs in train mode, so a one-view eval-mode cache cannot replay "
        "it; online the teacher trains, so it is online by construction.",
        "EMA: parameters move by the cosine momentum of the iteration that follows the step (the official update "
        "runs at the start of each iteration); EMA BatchNorm buffers are copied from the online network (the "
        "official EMA keeps its own running statistics; both run in train mode, so the loss is unaffected).",
        "Views: BYOL's asymmetric pair (byol1: blur 1.0; byol2: blur 0.1, solarize 0.2) for student and teacher.",
        "Online: the teacher's projector, predictor (pred_ttemadv) and EMA network live in the method "
        "(heads.safetensors, teacher_*) and train in the student's optimiser group; the teacher backbone trains in "
        "the teacher group (teacher_lr_scale 1: the official run optimises both with one LARS).",
        "SyncBN across GPUs as published needs train.sync_bn under DDP; per-rank BatchNorm otherwise.",
    )
    Params = SimDisParams

    def __init__(self, params: SimDisParams, student_dim: int, teacher_dims: TeacherDims | None) -> None:
        super().__init__(params, student_dim, teacher_dims)
        if teacher_dims is None:
            raise UsageError("simdis distils from a teacher", hint="--teacher NAME, or online: true with "
                             "--teacher scratch --teacher-arch resnet50")
        self.head = mlp([student_dim, params.projector_hidden_dim, params.projection_dim])
        if params.online:
            if teacher_dims.backbone is None:
                raise UsageError("simdis online needs the teacher network to build its EMA copy")
            self.target_key, target_dim = "pooled", params.projection_dim
            self.teacher_head = mlp([teacher_dims.pooled, params.projector_hidden_dim, params.projection_dim])
            self.teacher_predictor = Predictor(params.projection_dim, params.predictor_hidden_dim, params.projection_dim)
            self.teacher_ema = EMA(BackboneWithHead(teacher_dims.backbone, self.teacher_head))
        else:
            self.target_key, target_dim = teacher_target(self.name, teacher_dims, params.teacher_feature)
        self.predictors = nn.ModuleDict({
            name: Predictor(params.projection_dim, params.predictor_hidden_dim,
                            target_dim if name.startswith("t") else params.projection_dim)
            for name in params.predictors})
        self.target: EMA | None = None

    def setup(self, student: nn.Module) -> None:
        self.target = EMA(BackboneWithHead(student, self.head))

    def requirements(self, image_size: int) -> Requirements:
        views = tuple(MethodView(crop_view(self.params, image_size, family)) for family in ("byol1", "byol2"))
        return Requirements(views=views, teacher_outputs=frozenset({self.target_key}),
                            teacher_mode="co_trained" if self.params.online else "online", teacher_bn="train")

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        target = require_setup(self.target, self.name)
        projections = [self.head(f) for f in inputs.student_features]
        own = [F.normalize(z, dim=1).detach() for z in projections]
        with torch.no_grad():
            own_ema = [F.normalize(target(img), dim=1).to(projections[0].dtype) for img in inputs.images]
        raw = [out[self.target_key].to(projections[0].dtype) for out in inputs.teacher_outputs]
        teacher_z = [self.teacher_head(t) for t in raw] if self.params.online else raw
        teacher = [F.normalize(z, dim=1).detach() for z in teacher_z]
        teacher_ema = teacher
        if self.params.online:
            with torch.no_grad():
                teacher_ema = [F.normalize(self.teacher_ema(img), dim=1).to(projections[0].dtype)
                               for img in inputs.images]
        predictions = {name: (head(projections[0]), head(projections[1])) for name, head in self.predictors.items()}
        student_loss = simdis_student_loss(predictions, own, own_ema, teacher, teacher_ema)
        logs = {"student": student_loss.detach()}
        if not self.params.online:
            return student_loss, logs
        teacher_loss = byol_pair_loss(self.teacher_predictor(teacher_z[0]), teacher_ema[1],
                                      self.teacher_predictor(teacher_z[1]), teacher_ema[0])
        logs["teacher"] = teacher_loss.detach()
        return student_loss + teacher_loss, logs

    def momentum(self, inputs: MethodInputs) -> float:
        """The cosine momentum of the iteration after ``inputs.step`` (the official EMA update opens each iteration)."""
        total = inputs.total_epochs * inputs.steps_per_epoch
        progress = (inputs.step + 1) / total if total > 0 else inputs.epoch / max(1, inputs.total_epochs)
        return cosine_momentum(self.params.momentum, progress)

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        momentum = self.momentum(inputs)
        student = require_student(inputs.student, self.name)
        self.target.update(BackboneWithHead(student, self.head), momentum)
        if self.params.online and inputs.teacher is not None:
            self.teacher_ema.update(BackboneWithHead(inputs.teacher.backbone, self.teacher_head), momentum)
