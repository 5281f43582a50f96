"""SimCLR (Chen et al., ICML 2020) as an SSL-only method for ``pretrain`` and baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillctl.data.views import ViewSpec
from distillctl.methods.base import Method, MethodInputs, MethodParams, MethodView, Requirements, register
from distillctl.methods.common import mlp
from distillctl._infra import all_gather_concat, info
from distillctl.methods.domains import Count, CropScale, Positive
from distillctl.methods.collapse import LOG_KEY, embedding_cosine


class SimCLRParams(MethodParams):
    temperature: Positive = 0.2
    hidden_dim: Count | None = None
    out_dim: Count = 128
    crop_scale: CropScale = (0.08, 1.0)
    flip: bool = True


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over 2B embeddings: each view's positive is its pair, all other 2B−2 are negatives.

    Under DDP the other ranks' embeddings join as extra negatives (no gradient through them)."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    local = torch.cat([z1, z2])
    batch = z1.shape[0]
    dist_info = info()
    if dist_info.world_size > 1:
        others = all_gather_concat(local.detach())
        chunk = local.shape[0]
        keep = torch.ones(others.shape[0], dtype=torch.bool, device=others.device)
        keep[dist_info.rank * chunk:(dist_info.rank + 1) * chunk] = False
        others = others[keep]
    else:
        others = local.new_zeros((0, local.shape[1]))
    candidates = torch.cat([local, others])
    logits = local @ candidates.t() / temperature
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[:, : 2 * batch].fill_diagonal_(True)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(batch, 2 * batch), torch.arange(0, batch)]).to(logits.device)
    return F.cross_entropy(logits, targets)


@register
class SimCLR(Method):
    name = "simclr"
    kind = "ssl"
    title = "SimCLR: A simple framework for contrastive learning of visual representations (Chen et al., ICML 2020)"
    objective = (
        "Two strong augmentations per image; z = g(S(x)) with g = Linear–BN–ReLU–Linear(128); NT-Xent: each view's "
        "positive is its pair, the other 2B−2 views of the batch are negatives, temperature τ. No teacher."
    )
    published = "ResNet-50 (1x), 1000 epochs, batch 4096: 69.3 linear top-1 on ImageNet (google-research/simclr)."
    Params = SimCLRParams

    def __init__(self, params: SimCLRParams, student_dim: int, teacher_dims=None) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.head = mlp([student_dim, params.hidden_dim or student_dim, params.out_dim])

    def requirements(self, image_size: int) -> Requirements:
        spec = ViewSpec(size=image_size, family="simclr", scale=self.params.crop_scale, flip=self.params.flip)
        view = MethodView(spec, teacher=False)
        return Requirements(views=(view, view), teacher_outputs=frozenset(), teacher_mode="none")

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        z1, z2 = (self.head(f) for f in inputs.student_features)
        return nt_xent(z1, z2, self.params.temperature), {LOG_KEY: embedding_cosine(z1)}
