"""PCD: Pixel-wise Contrastive Distillation (Huang et al., arXiv 2211.00218; ICCV 2023). No official code.

Every location of the student's last-stage map is contrasted with the teacher's embedding of the same location
(positive) against a queue of teacher location embeddings (negatives), MoCo style. Two pieces come from the paper:
a plug-in multi-head self-attention (MHSA) block on the student's map, which widens its receptive field, and a
*SpatialAdaptor* that turns the teacher's vector projection head into a 1×1-convolution head on maps. Works for
CNN and ViT students and teachers (ViT maps are the patch tokens on their grid, see ``dense_common``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distillctl.errors import UsageError
from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, register
from distillctl.methods.common import FeatureQueue
from distillctl.methods.dense_common import MapGeometry, as_map, map_geometry, teacher_map_geometry
from distillctl.methods.domains import Count, Positive
from distillctl.methods.shared import CropParams, crop_view


class PCDParams(CropParams):
    temperature: Positive = 0.2  # τ of the InfoNCE (MoCo v2's; the paper's value was not retrieved)
    queue_size: Count = 65536  # teacher location embeddings kept as negatives
    hidden_dim: Count = 2048  # the student's 1×1-conv projection head: C → hidden → out
    mhsa: bool = True  # the plug-in multi-head self-attention block on the student map
    mhsa_heads: Count = 8
    teacher_head: Literal["auto", "none"] = "auto"  # auto: SpatialAdaptor of the teacher's projection head if any
    student_tap: str = "stage:-1"
    teacher_tap: str = "stage:-1"
    teacher_bn: Literal["eval", "train"] = "eval"


class SpatialAdaptor(nn.Module):
    """A vector MLP head (Linear / BatchNorm1d / ReLU) applied at every location of a B×C×h×w map as 1×1 convs.

    The weights are the head's own, held as buffers (never trained); BatchNorm always uses the head's running
    statistics, so each location is normalised exactly as the pooled vectors the head was trained on."""

    def __init__(self, head: nn.Sequential | None) -> None:
        super().__init__()
        self.layers: list[tuple[str, str, float]] = []  # (kind, buffer prefix, BatchNorm eps)
        for index, layer in enumerate(head or []):
            prefix = f"layer{index}_"
            if isinstance(layer, nn.Linear):
                self.register_buffer(prefix + "weight", layer.weight.detach().clone())
                self.register_buffer(prefix + "bias", None if layer.bias is None else layer.bias.detach().clone())
                self.layers.append(("linear", prefix, 0.0))
            elif isinstance(layer, nn.BatchNorm1d):
                for name in ("running_mean", "running_var"):
                    self.register_buffer(prefix + name, getattr(layer, name).detach().clone())
                for name in ("weight", "bias"):
                    value = getattr(layer, name)
                    self.register_buffer(prefix + name, None if value is None else value.detach().clone())
                self.layers.append(("bn", prefix, float(layer.eps)))
            elif isinstance(layer, nn.ReLU):
                self.layers.append(("relu", prefix, 0.0))
            else:
                raise UsageError(f"pcd: cannot adapt a {type(layer).__name__} layer of the teacher head to maps",
                                 hint="set method.params.teacher_head=none")

    def out_channels(self, in_channels: int) -> int:
        linears = [prefix for kind, prefix, _ in self.layers if kind == "linear"]
        return int(getattr(self, linears[-1] + "weight").shape[0]) if linears else in_channels

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = maps
        for kind, prefix, eps in self.layers:
            if kind == "linear":
                weight, bias = getattr(self, prefix + "weight"), getattr(self, prefix + "bias")
                x = F.conv2d(x, weight[:, :, None, None].to(x.dtype), None if bias is None else bias.to(x.dtype))
            elif kind == "bn":
                x = F.batch_norm(x, getattr(self, prefix + "running_mean"), getattr(self, prefix + "running_var"),
                                 getattr(self, prefix + "weight"), getattr(self, prefix + "bias"), training=False,
                                 eps=eps)
            else:
                x = F.relu(x)
        return x


class MapSelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over the h·w locations of a map, with a residual (the plug-in MHSA)."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise UsageError(f"pcd: {channels} student channels are not divisible by mhsa_heads={heads}",
                             hint="set method.params.mhsa_heads to a divisor of the channel count")
        self.norm = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = maps.shape
        tokens = maps.flatten(2).transpose(1, 2)
        normed = self.norm(tokens)
        tokens = tokens + self.attention(normed, normed, normed, need_weights=False)[0]
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


def pixel_info_nce(student: torch.Tensor, teacher: torch.Tensor, negatives: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """InfoNCE at every location: (B, D, h, w) L2-normalised maps; the positive is the teacher at the same
    location, the negatives the queue rows (K×D); mean over batch and locations."""
    queries = student.permute(0, 2, 3, 1).reshape(-1, student.shape[1])
    keys = teacher.permute(0, 2, 3, 1).reshape(-1, teacher.shape[1])
    positive = (queries * keys).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, queries @ negatives.t().to(queries.dtype)], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device))


@register
class PCD(Method):
    name = "pcd"
    title = "PCD: Pixel-wise contrastive distillation (Huang et al., arXiv 2211.00218; ICCV 2023)"
    objective = (
        "L = mean over locations i of −log( exp(s_i·t_i/τ) / (exp(s_i·t_i/τ) + Σ_k exp(s_i·q_k/τ)) ), with "
        "s = n(G(resize(MHSA(S_map(x))))) the student's map through the plug-in MHSA block, bilinear resize to the "
        "teacher grid and a 1×1-conv projection head G, t = n(A(T_map(x))) the teacher map through the SpatialAdaptor "
        "A (its projection head as 1×1 convs), and q a FIFO queue of teacher location embeddings; one view for both."
    )
    published = (
        "ResNet-18-FPN with Mask R-CNN on COCO: 37.4 AP_bbox / 34.0 AP_mask (abstract); ResNet-18 linear probe 65.1 "
        "(secondary source). Teacher, τ, queue size and head sizes were not retrieved (methods.md §10)."
    )
    sources = "No official code found (methods.md §10); built from the paper's description, choices listed below."
    assumptions = (
        "Correspondence: both networks see the same view, so location i of the student map (resized bilinearly to "
        "the teacher grid) pairs with location i of the teacher map; no geometric matching across views.",
        "SpatialAdaptor: the teacher's projection head with Linear → 1×1 conv and BatchNorm in eval mode with its "
        "running statistics (the distribution of the pooled vectors it was trained on); a teacher without a head "
        "(or teacher_head=none) gives its map unchanged.",
        "MHSA: one pre-norm multi-head self-attention block with a residual over the student map's locations, no "
        "position embedding, 8 heads; placed before the resize and the projection head.",
        "Student head: 1×1 conv (C → 2048) – BatchNorm – ReLU – 1×1 conv (→ the adapted teacher width).",
        "τ = 0.2 and a 65,536-row queue (MoCo v2's); every location of the batch is enqueued after each step.",
        "The teacher sees the student's own view, so a feature cache holding its map (stored as a teacher tap beside "
        "the pooled vector) stands in for it exactly (cached_exact); online when the maps would be too large to "
        "cache. The SpatialAdaptor runs on the stored map at every step.",
    )
    Params: ClassVar[type[PCDParams]] = PCDParams
    queue_negatives: ClassVar[bool] = True

    def __init__(self, params: PCDParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.teacher_geometry = teacher_map_geometry(self.name, teacher_dims, params.teacher_tap)
        head = getattr(teacher_dims, "projection", None) if params.teacher_head == "auto" else None
        self.adaptor = SpatialAdaptor(head)
        first = next((m for m in (head or []) if isinstance(m, nn.Linear)), None)
        if first is not None and getattr(teacher_dims, "backbone", None) is not None \
                and first.in_features != self.teacher_geometry.channels:
            raise UsageError(f"pcd: the teacher's projection head takes {first.in_features}-d vectors but its "
                             f"{params.teacher_tap} map has {self.teacher_geometry.channels} channels",
                             hint="tap the stage the head was trained on (stage:-1), or set method.params.teacher_head=none")
        self.embed_dim = self.adaptor.out_channels(self.teacher_geometry.channels)
        self.queue = FeatureQueue(params.queue_size, self.embed_dim)
        self.student_geometry = MapGeometry(0)
        self.mhsa: nn.Module = nn.Identity()
        self.head: nn.Module = nn.Identity()

    def setup(self, student: nn.Module) -> None:
        """Build the MHSA block and the projection head for the student's tapped stage."""
        self.student_geometry = map_geometry(student, self.params.student_tap)
        channels = self.student_geometry.channels
        self.mhsa = MapSelfAttention(channels, self.params.mhsa_heads) if self.params.mhsa else nn.Identity()
        hidden = self.params.hidden_dim
        self.head = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(),
                                  nn.Conv2d(hidden, self.embed_dim, 1))

    def requirements(self, image_size: int) -> Requirements:
        view = crop_view(self.params, image_size, "weak")
        return Requirements(views=(MethodView(view),), teacher_outputs=frozenset({"pooled"}),
                            teacher_mode="cached_exact",
                            teacher_bn=self.params.teacher_bn, student_taps=(self.params.student_tap,),
                            teacher_taps=(self.params.teacher_tap,))

    def teacher_embedding(self, inputs: MethodInputs) -> torch.Tensor:
        """The teacher's L2-normalised location embeddings, B×D×h×w (SpatialAdaptor of its map)."""
        teacher_map = as_map(inputs.teacher_outputs[0][self.params.teacher_tap], self.teacher_geometry.prefix_tokens)
        with torch.no_grad():
            return F.normalize(self.adaptor(teacher_map.detach().float()), dim=1)

    def student_embedding(self, inputs: MethodInputs, grid: tuple[int, int]) -> torch.Tensor:
        """The student's L2-normalised location embeddings on the teacher ``grid`` (MHSA, resize, 1×1 head)."""
        student_map = as_map(inputs.student_taps[0][self.params.student_tap], self.student_geometry.prefix_tokens)
        student_map = F.interpolate(self.mhsa(student_map), size=grid, mode="bilinear", align_corners=False)
        return F.normalize(self.head(student_map), dim=1)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        teacher = self.teacher_embedding(inputs)
        student = self.student_embedding(inputs, tuple(teacher.shape[-2:]))
        loss = pixel_info_nce(student, teacher.to(student.dtype), self.queue.data.clone(), self.params.temperature)
        positive = (student.detach() * teacher.to(student.dtype)).sum(dim=1).mean()
        return loss, {"pos_cos": positive.detach()}

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        teacher = self.teacher_embedding(inputs)
        self.queue.enqueue(teacher.permute(0, 2, 3, 1).reshape(-1, teacher.shape[1]))
