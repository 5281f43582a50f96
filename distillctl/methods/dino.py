"""DINO (Caron et al., ICCV 2021) with the SSLight settings (Chen et al., ICLR 2023) as an SSL-only method.

SSLight keeps DINO's objective and changes what small networks find too hard: global crops
cover 0.3–1 of the image, the six local crops are larger (128 px, scale 0.05–0.3), and the
global–global and global–local terms are re-weighted 0.4 / 0.6 instead of DINO's implicit
2/14 / 12/14. The teacher is an EMA of student + head; its outputs are centred (EMA centre) and
sharpened with a temperature that warms up from 0.04 to 0.07.

Forward as in the published MultiCropWrapper (saic-fi/SSLight ``sslight/backbone/layer.py``, DINO's
``utils.py``): the backbone runs once per resolution group (the two global crops together, the local crops
together: ``grouping="by_resolution"``), the head once on all crops concatenated, and the EMA teacher once on
the two global crops concatenated, so train-mode BatchNorm in backbone and head sees those batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distillctl.data.views import ViewSpec
from distillctl.methods.base import Method, MethodInputs, MethodParams, MethodView, Requirements, register
from distillctl.methods.common import EMA, cosine_momentum
from distillctl.methods.domains import Count, CropScale, Momentum, NonNegative, OptionalCount, Positive, WeightPair
from distillctl.methods.shared import (BackboneWithHead, at_least_float32, float32_similarity, require_setup,
                                       require_student, scaled_crop_size)
from distillctl._infra import all_reduce_mean


class DINOParams(MethodParams):
    flip: bool = True  # horizontal flips on every crop (turn off for digits/text)
    out_dim: Count = 4096
    hidden_dim: Count = 2048
    bottleneck_dim: Count = 256
    use_bn_in_head: bool = True
    norm_last_layer: bool = True
    freeze_last_layer_epochs: NonNegative = 1  # no gradient into the prototype layer during the first epoch(s)
    momentum: Momentum = 0.996  # teacher EMA, cosine to 1
    student_temperature: Positive = 0.1
    warmup_teacher_temperature: Positive = 0.04
    teacher_temperature: Positive = 0.07
    warmup_teacher_temperature_epochs: NonNegative = 50  # fractional: the auto preset's share of a short run
    center_momentum: Momentum = 0.9
    global_crop_scale: CropScale = (0.3, 1.0)  # DINO baseline: (0.14, 1)
    local_crops: OptionalCount = 6
    local_crop_size: Count = 128  # at 224 px, scaled with data.image_size; DINO baseline: 96
    local_crop_scale: CropScale = (0.05, 0.3)  # DINO baseline: (0.05, 0.14)
    loss_weights: WeightPair = (0.4, 0.6)  # (global–global, global–local); DINO's mean ≈ (0.143, 0.857)


class DINOHead(nn.Module):
    """MLP (Linear–BN–GELU ×2, Linear to the bottleneck), L2 normalisation, weight-normalised prototypes."""

    def __init__(self, in_dim: int, params: DINOParams) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim, params.hidden_dim, params.hidden_dim]
        for a, b in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(a, b))
            if params.use_bn_in_head:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.GELU())
        layers.append(nn.Linear(params.hidden_dim, params.bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # The official head applies trunc_normal(0.02) to the MLP only and creates the weight-normalised prototype
        # layer afterwards, so v keeps nn.Linear's default init (kaiming-uniform, a=√5: U(±1/√bottleneck)).
        self.prototype_direction = nn.Parameter(torch.empty(params.out_dim, params.bottleneck_dim))
        nn.init.kaiming_uniform_(self.prototype_direction, a=math.sqrt(5))
        # weight norm: W = g · v/‖v‖; g starts at 1 and with norm_last_layer stays fixed there
        self.prototype_scale = nn.Parameter(torch.ones(params.out_dim, 1), requires_grad=not params.norm_last_layer)
        self.freeze_prototypes = False

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embedding = F.normalize(self.mlp(features), dim=-1)
        weight = self.prototype_scale * F.normalize(self.prototype_direction, dim=1)
        if self.freeze_prototypes:
            weight = weight.detach()  # like DINO's cancel_gradients: the layer gets no gradient at all
        return float32_similarity(embedding, weight)  # cosine logits later divided by τ ≤ 0.1


def teacher_temperature(params: DINOParams, epoch: float) -> float:
    """Linear warm-up over ``warmup_teacher_temperature_epochs`` epochs, then constant. A whole number of epochs
    follows DINO's per-epoch schedule (np.linspace endpoints at the integer epoch); a fractional one (the auto
    preset on a short run) ramps continuously over the fractional epoch."""
    warm = float(params.warmup_teacher_temperature_epochs)
    start, end = params.warmup_teacher_temperature, params.teacher_temperature
    if epoch >= warm:
        return end
    if not warm.is_integer():
        return start + (end - start) * epoch / warm
    epoch = int(epoch)
    if warm == 1:
        return start
    return start + (end - start) * epoch / (warm - 1)


def dino_loss(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor],
              weights: tuple[float, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """Cross-entropy of every student view against every *other* teacher (global) view; global–global
    and global–local terms are averaged separately and mixed with ``weights`` (SSLight)."""
    global_terms, local_terms = [], []
    n_global = len(teacher_probs)
    for iq, probs in enumerate(teacher_probs):
        for v, logits in enumerate(student_logits):
            if v == iq:
                continue
            term = torch.sum(-probs * F.log_softmax(logits, dim=-1), dim=-1).mean()
            (global_terms if v < n_global else local_terms).append(term)
    global_loss = torch.stack(global_terms).mean()
    if not local_terms:
        return global_loss, {"global": global_loss.detach()}
    local_loss = torch.stack(local_terms).mean()
    loss = weights[0] * global_loss + weights[1] * local_loss
    return loss, {"global": global_loss.detach(), "local": local_loss.detach()}


@register
class DINO(Method):
    name = "dino"
    kind = "ssl"
    title = "DINO with SSLight view settings: effective SSL pre-training on low-compute networks (Chen et al., ICLR 2023)"
    objective = (
        "2 global crops (scale 0.3–1) and 6 local 128-px crops (scale 0.05–0.3). Student logits z = h(S(x))/τ_s with "
        "h = 3-layer MLP (BN, GELU) → L2 norm → weight-normalised 4096 prototypes, τ_s = 0.1; the teacher is an EMA "
        "of S and h (0.996 → 1, cosine) and sees the global crops; P_T = softmax((z_T − c)/τ_t) with the EMA centre "
        "c (0.9) and τ_t warming from 0.04 to 0.07 over 50 epochs. L = 0.4·mean(global–global CE) + "
        "0.6·mean(global–local CE), each CE = −Σ P_T log softmax(z_S) over pairs of different views. No teacher model."
    )
    published = (
        "ImageNet linear, DINO baseline → SSLight (saic-fi/SSLight README): MobileNetV2 66.2 → 68.3, ResNet-18 "
        "62.2 → 65.7, ResNet-34 67.7 → 69.7, ViT-Tiny/16 66.7 → 69.5. Recipe: LARS, base lr 0.48 scaled linearly "
        "(lr = 0.48 · global batch / 256 = 1.92), min lr 0.0048, wd 1e-6, 10 warm-up epochs, 200 epochs, global "
        "batch 1024 = 128 per GPU × 8 GPUs with SyncBatchNorm (config TRAIN.BATCH_SIZE is per GPU; paper: "
        "batch 1024, 8-GPU server)."
    )
    Params = DINOParams

    def __init__(self, params: DINOParams, student_dim: int, teacher_dims=None) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.head = DINOHead(student_dim, params)
        self.register_buffer("center", torch.zeros(1, params.out_dim))
        self.teacher: EMA | None = None

    def setup(self, student: nn.Module) -> None:
        self.teacher = EMA(BackboneWithHead(student, self.head))

    def requirements(self, image_size: int) -> Requirements:
        scale = tuple(self.params.global_crop_scale)
        globals_ = tuple(MethodView(ViewSpec(size=image_size, family=f, scale=scale, flip=self.params.flip), teacher=False)
                         for f in ("byol1", "byol2"))
        # DINO's local crops: jitter p=0.8, grayscale 0.2, blur 0.5, no solarisation — the mocov2 family
        # (whose saturation jitter is 0.4 where DINO uses 0.2).
        local = MethodView(ViewSpec(size=scaled_crop_size(image_size, self.params.local_crop_size), family="mocov2",
                                    scale=tuple(self.params.local_crop_scale), flip=self.params.flip), teacher=False)
        return Requirements(views=globals_ + (local,) * self.params.local_crops, teacher_outputs=frozenset(),
                            teacher_mode="none", grouping="by_resolution")

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        teacher = require_setup(self.teacher, self.name)
        epoch = float(inputs.epoch)
        self.head.freeze_prototypes = epoch < self.params.freeze_last_layer_epochs
        views = len(inputs.student_features)
        # head once on every crop (global crops first), teacher once on the two global crops, as published
        student_logits = list((self.head(torch.cat(inputs.student_features)) / self.params.student_temperature)
                              .chunk(views))
        with torch.no_grad():
            teacher_all = at_least_float32(teacher(torch.cat(inputs.images[:2])))
        teacher_logits = list(teacher_all.chunk(2))
        inputs.extras["dino_teacher_logits"] = teacher_all
        temperature = teacher_temperature(self.params, epoch)
        probs = [F.softmax((t - self.center) / temperature, dim=-1).to(student_logits[0].dtype) for t in teacher_logits]
        loss, logs = dino_loss(student_logits, probs, tuple(self.params.loss_weights))
        logs["teacher_temperature"] = temperature
        return loss, logs

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        batch_center = all_reduce_mean(inputs.extras["dino_teacher_logits"].mean(dim=0, keepdim=True))
        self.center.mul_(self.params.center_momentum).add_(batch_center, alpha=1 - self.params.center_momentum)
        momentum = cosine_momentum(self.params.momentum, inputs.epoch / max(1, inputs.total_epochs))
        self.teacher.update(BackboneWithHead(require_student(inputs.student, self.name), self.head), momentum)
