"""MoCo v2 (Chen et al. 2020) as an SSL-only method: used by ``pretrain`` for teachers and as the
"student trained alone" baseline. ``ssl-small`` is the same objective with the tuned small-model
recipe of Shi et al. (AAAI 2022): wide MLP head, τ=0.1, stronger colour jitter."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from distillctl._infra import all_gather_concat, info
from distillctl.data.views import ViewSpec
from distillctl.methods.base import Method, MethodInputs, MethodParams, MethodView, Requirements, register
from distillctl.methods.common import EMA, FeatureQueue, cosine_momentum, info_nce, mlp, mlp_relu
from distillctl.methods.domains import Augmentation, Count, CropScale, Momentum, Positive
from distillctl.methods.collapse import LOG_KEY, embedding_cosine


class MocoV2Params(MethodParams):
    queue_size: Count = 65536
    temperature: Positive = 0.2
    momentum: Momentum = 0.999
    hidden_dim: Count | None = None  # default: the student's feature dim (MoCo v2: 2048 for R50)
    out_dim: Count = 128
    symmetric: bool = True  # both views as queries (2 loss terms per step); MoCo v2 used one
    augmentation: Augmentation = "mocov2"
    crop_scale: CropScale = (0.2, 1.0)  # RandomResizedCrop area range
    flip: bool = True  # horizontal flips (turn off for digits/text)
    momentum_schedule: bool = False  # cosine ramp of the EMA momentum to 1 (BYOL-style)
    # BatchNorm after the head's hidden layer (Linear–BN–ReLU–Linear, as in SimCLR's and MoCo v3's heads);
    # MoCo v2's head has none
    head_bn: bool = False
    # queue: K past keys are the negatives (MoCo v2). batch: the keys of the step's other images are (MoCo v3's
    # negatives; no queue is kept). On short runs the queue's older keys differ from the fresh positive by the
    # encoder's drift, a shortcut that collapses the student (benchmarks/RESULTS.md); method.preset=auto
    # chooses batch there (distillctl.methods.presets.derive_negatives)
    negatives: Literal["queue", "batch"] = "queue"


class _Encoder(nn.Module):
    """Backbone + projection head; the EMA key encoder is a copy of this."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def batch_logits(query: torch.Tensor, keys: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, own column): ``query`` (B×D) against the keys of every rank's batch (all-gathered, no gradient),
    / τ; query b's own key is column ``rank·B + b`` (MoCo v3's labels). Inputs L2-normalised."""
    gathered = all_gather_concat(keys)
    own = torch.arange(query.shape[0], device=query.device) + info().rank * query.shape[0]
    return query @ gathered.t() / temperature, own


def batch_info_nce(query: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with in-batch negatives: row b's positive is its own key, the other images' keys are negatives."""
    logits, own = batch_logits(query, keys, temperature)
    return F.cross_entropy(logits, own)


@register
class MocoV2(Method):
    name = "mocov2"
    queue_negatives = True
    kind = "ssl"
    title = "MoCo v2: Improved baselines with momentum contrastive learning (Chen et al., 2020)"
    objective = (
        "Two MoCo-v2 augmentations of each image; queries q = n(g(S(x1))), keys k = n(g_ema(S_ema(x2))) from a "
        "momentum (EMA, m=0.999) copy of student+head; InfoNCE over [q·k+, q·Q]/τ with a queue Q of past keys "
        "(K=65536, τ=0.2); negatives=batch: Q = the keys of the batch's other images instead (MoCo v3), no queue. "
        "No teacher."
    )
    published = "ResNet-50, 200 epochs: 67.5 linear top-1 (800 epochs: 71.1) on ImageNet (facebookresearch/moco)."
    Params = MocoV2Params

    def __init__(self, params: MocoV2Params, student_dim: int, teacher_dims=None) -> None:
        super().__init__(params, student_dim, teacher_dims)
        dims = [student_dim, params.hidden_dim or student_dim, params.out_dim]
        self.head = mlp(dims) if params.head_bn else mlp_relu(dims)
        # batch negatives keep no queue (nothing stale in the checkpoint, no rows left at their random start)
        self.queue = FeatureQueue(params.queue_size, params.out_dim) if params.negatives == "queue" else None
        self.key_encoder: EMA | None = None

    def setup(self, student: nn.Module) -> None:
        self.key_encoder = EMA(_Encoder(student, self.head))

    def requirements(self, image_size: int) -> Requirements:
        spec = ViewSpec(size=image_size, family=self.params.augmentation, scale=self.params.crop_scale,
                        flip=self.params.flip)
        view = MethodView(spec, teacher=False)
        return Requirements(views=(view, view), teacher_outputs=frozenset(), teacher_mode="none")

    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.key_encoder(images), dim=1)

    def _contrast(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """InfoNCE of ``query`` against its own key (row b of ``keys``): with the queue as negatives, or with the
        keys of the batch's other images (all ranks' keys, MoCo v3 style)."""
        keys = keys.to(query.dtype)
        if self.queue is not None:
            return info_nce(query, keys, self.queue.data.to(query.dtype), self.params.temperature)
        return batch_info_nce(query, keys, self.params.temperature)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        queries = [F.normalize(self.head(f), dim=1) for f in inputs.student_features]
        keys = [self._keys(img) for img in inputs.images]
        loss = self._contrast(queries[0], keys[1])
        if self.params.symmetric:
            loss = (loss + self._contrast(queries[1], keys[0])) / 2
        inputs.extras["keys"] = keys[1] if not self.params.symmetric else torch.cat(keys)
        return loss, {LOG_KEY: embedding_cosine(queries[0])}

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        progress = inputs.epoch / max(1, inputs.total_epochs)
        momentum = cosine_momentum(self.params.momentum, progress) if self.params.momentum_schedule else self.params.momentum
        self.key_encoder.update(_Encoder(inputs.student, self.head), momentum)
        if self.queue is not None:
            self.queue.enqueue(inputs.extras["keys"].float())
