"""AttnDistill (Wang et al., BMVC 2022; arXiv 2210.00944): ViT → ViT distillation of the CLS token and the CLS
attention row.

The student's last-block tokens go through a 4-layer projector and a LayerNorm to the teacher's width; its CLS
token regresses the teacher's final-norm CLS token (MSE), and the student's CLS→token attention of a chosen block
matches the teacher's (KL, per head, after clamping to [1e-5, 0.996] and renormalising). A teacher with a finer
patch grid has its patch attention resized bicubically to the student's grid and rescaled so the patch mass stays
1 − CLS self-attention. Different head counts need head aggregation, softmax(Σ_h log A / T), as published.
Both attention rows come from the training forward (``attn:<b>`` taps); no second pass.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillctl.errors import UsageError
from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, register
from distillctl.methods.domains import Count, NonNegative, Positive
from distillctl.methods.shared import CropParams, at_least_float32, crop_view

ATTENTION_FLOOR, ATTENTION_CEILING = 1e-5, 0.996  # the official clamp of both attention rows


class AttnDistillParams(CropParams):
    weight_cls: NonNegative = 1.0  # dino_teacher.sh WEIGHT_CLS
    weight_attn: NonNegative = 0.1  # dino_teacher.sh WEIGHT_ATTN
    projector_layers: Count = 4  # LayerNorm, then d → 2d → d → 2d → d_T (GELU between)
    head_aggregation: bool = False  # softmax(Σ_h log A / T): needed when the head counts differ
    aggregation_temperature: Positive = 10.0  # dino_teacher.sh ATTN_T
    # whose attention row is distilled, as taps attn:<block> (official: the last block of both)
    student_attention: str = Field("attn:-1", pattern=r"^attn:-?\d+$")
    teacher_attention: str = Field("attn:-1", pattern=r"^attn:-?\d+$")
    teacher_bn: Literal["eval", "train"] = "eval"


def student_projector(student_dim: int, teacher_dim: int, layers: int) -> nn.Sequential:
    """LayerNorm(d) then Linear/GELU through widths d, 2d, d, 2d, … ending at d_T (the official layout)."""
    widths = [student_dim] + [2 * student_dim if i % 2 == 0 else student_dim for i in range(layers - 1)] + [teacher_dim]
    modules: list[nn.Module] = [nn.LayerNorm(student_dim, eps=1e-6)]
    for i in range(layers - 1):
        modules += [nn.Linear(widths[i], widths[i + 1]), nn.GELU()]
    modules.append(nn.Linear(widths[layers - 1], widths[layers]))
    return nn.Sequential(*modules)


def resize_patch_attention(attention: torch.Tensor, grid: int, nonnegative: bool = False) -> torch.Tensor:
    """(B, H, 1 + g²) CLS rows → (B, H, 1 + grid²): patches resized bicubically, rescaled to keep 1 − CLS mass.

    Bicubic resizing can overshoot below zero; ``nonnegative`` clamps at 0 before the rescale (head aggregation
    takes logs, where the official code produces NaN and skips the step)."""
    batch, heads, tokens = attention.shape
    side = int(round((tokens - 1) ** 0.5))
    cls, patches = attention[:, :, :1], attention[:, :, 1:].reshape(batch, heads, side, side)
    patches = F.interpolate(patches, size=grid, mode="bicubic").reshape(batch, heads, -1)
    if nonnegative:
        patches = patches.clamp_min(0)
    patches = patches * ((1 - cls) / patches.sum(-1, keepdim=True))
    return torch.cat([cls, patches], dim=-1)


def aggregate_heads(attention: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(Σ_h log A_h / T) over tokens: one distribution per image from all heads."""
    return F.softmax(attention.log().sum(dim=1) / temperature, dim=-1)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(A_T ‖ A_S) summed over heads and tokens, averaged over the batch, after clamp + L1 renormalisation."""
    student = F.normalize(student.clamp(ATTENTION_FLOOR, ATTENTION_CEILING), p=1, dim=-1)
    teacher = F.normalize(teacher.clamp(ATTENTION_FLOOR, ATTENTION_CEILING), p=1, dim=-1)
    return F.kl_div(student.log(), teacher, reduction="batchmean")


def _block(tap: str) -> int:
    return int(tap.partition(":")[2])


def _vit_shape(model: nn.Module | None, who: str, block: int) -> tuple[int, int] | None:
    """(heads of ``block``, prefix tokens) of a timm ViT; None when the network is not known yet."""
    if model is None:
        return None
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(blocks[block], "attn"):
        raise UsageError(f"attndistill needs a ViT {who} (timm blocks with attention)",
                         hint="use a ViT, e.g. --student vit_tiny_patch16_224 and a DINO/iBOT/MoCo-v3 ViT teacher")
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if prefix != 1:
        raise UsageError(f"attndistill: the {who} has {prefix - 1} register tokens; the published method uses "
                         "CLS + patches only")
    return int(blocks[block].attn.num_heads), prefix


@register
class AttnDistill(Method):
    name = "attndistill"
    title = "AttnDistill: Attention distillation for self-supervised ViT students (Wang et al., BMVC 2022)"
    objective = (
        "L = w_cls·MSE(LN(P(z_S[CLS])), T_CLS) + w_attn·KL(A_T ‖ A_S), where z_S are the student's last-block tokens, "
        "P the 4-layer projector to the teacher width, T_CLS the teacher's final-norm CLS token, and A the CLS "
        "attention rows (B×heads×tokens) of the chosen blocks, clamped to [1e-5, 0.996] and renormalised; KL sums "
        "heads and tokens and averages the batch. A finer teacher grid is resized bicubically (patch mass kept at "
        "1 − CLS); different head counts need softmax(Σ_h log A / T)."
    )
    published = (
        "State-of-the-art k-NN for ViT-S among SSL-from-scratch methods on ImageNet (abstract; per-pair numbers not "
        "retrieved). Pairs: DINO ViT-S/8 → ViT-S/16, Mugs ViT-B/16 → ViT-S/16, ViT-S → ViT-T; 800 epochs, AdamW "
        "(0.9, 0.95), wd 0.05, base lr 1.5e-4 × 4096/256, 40 warm-up epochs, RandomResizedCrop(0.2–1) + flip."
    )
    sources = (
        "Official code read: wangkai930418/attndistill @ 5a5f4e9 (2022-10-04): engine/engine_dino_transfer.py "
        "(losses, interpolation, aggregation, clamp), models/dino_vit_student.py + models/mlp.py (projector, norm, "
        "CLS), models/trans_vit.py (attention row), dino_teacher.sh (weights 1.0 / 0.1, ATTN_T 10, --interpolate). "
        "Checked in a scratch harness on identical float64 tensors (the official loss block executed verbatim, its "
        "get_mlp_student projector and its Attention class): CLS MSE and attention KL agree to ≤ 1e-15 relative in "
        "five cases (equal grids; teacher grid 2x finer, bicubic resize; head aggregation with 4 → 2 and 6 → 3 "
        "heads, with and without resize), the projector + LayerNorm output likewise, and the attention tap of a "
        "timm block equals the official Attention's CLS row to 1e-16. One case differs on purpose: aggregation "
        "after a bicubic overshoot below zero, where the official loss is NaN (see assumptions)."
    )
    assumptions = (
        "The teacher CLS is the final-norm token ('tokens' tap), the student CLS the last block's output before "
        "its own final norm, through the projector and a LayerNorm(d_T) (the official student skips its own norm "
        "when the projector is on).",
        "Interpolation (official --interpolate) applies only when the two patch grids differ; on equal grids the "
        "official bicubic resize and rescale are the identity.",
        "Iterations with a NaN output are not skipped (the official loop skips them silently); the trainer's "
        "non-finite-loss policy applies instead. The teacher runs under no_grad and frozen.",
        "Register tokens (DINOv2/DINOv3 teachers) are refused: the published method has CLS + patches only.",
        "With head aggregation and a resized teacher grid, bicubic overshoot below zero is clamped to 0 before the "
        "rescale (officially log of a negative number: a NaN loss, the step skipped); without aggregation the "
        "official order is kept exactly.",
        "projector_layers < 4 still ends at the teacher width (officially only the 4-layer projector does).",
    )
    Params: ClassVar[type[AttnDistillParams]] = AttnDistillParams
    vit_only: ClassVar[bool] = True  # student and teacher must be ViTs (tests build ViT stand-ins)

    def __init__(self, params: AttnDistillParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        if teacher_dims is None:
            raise UsageError("attndistill needs a ViT teacher", hint="pass --teacher dino-vits16 (or another ViT)")
        self.teacher_shape = _vit_shape(getattr(teacher_dims, "backbone", None), "teacher",
                                        _block(params.teacher_attention))
        self.projector = student_projector(student_dim, int(teacher_dims.pooled), params.projector_layers)
        self.norm = nn.LayerNorm(int(teacher_dims.pooled), eps=1e-6)

    def setup(self, student: nn.Module) -> None:
        student_shape = _vit_shape(student, "student", _block(self.params.student_attention))
        if self.teacher_shape is not None and student_shape is not None and not self.params.head_aggregation \
                and student_shape[0] != self.teacher_shape[0]:
            raise UsageError(f"attndistill: the teacher has {self.teacher_shape[0]} heads, the student "
                             f"{student_shape[0]}; per-head KL needs equal counts",
                             hint="set method.params.head_aggregation=true, or build the student with "
                                  f"--set student.kwargs.num_heads={self.teacher_shape[0]}")

    @property
    def _taps(self) -> tuple[str, str, str, str]:
        return ("stage:-1", self.params.student_attention, "tokens", self.params.teacher_attention)

    def requirements(self, image_size: int) -> Requirements:
        student_tokens, student_attn, teacher_tokens, teacher_attn = self._taps
        view = crop_view(self.params, image_size, "weak")
        return Requirements(views=(MethodView(view),), teacher_outputs=frozenset({"pooled"}), teacher_mode="online",
                            teacher_bn=self.params.teacher_bn, student_taps=(student_tokens, student_attn),
                            teacher_taps=(teacher_tokens, teacher_attn))

    def terms(self, student_tokens: torch.Tensor, student_attention: torch.Tensor, teacher_tokens: torch.Tensor,
              teacher_attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS MSE, attention KL) from the student's block tokens and CLS rows and the teacher's."""
        cls_student = self.norm(self.projector(student_tokens[:, 0]))
        cls_loss = F.mse_loss(cls_student, teacher_tokens[:, 0].to(cls_student.dtype))
        attention_s, attention_t = at_least_float32(student_attention), at_least_float32(teacher_attention.detach())
        if attention_t.shape[-1] != attention_s.shape[-1]:
            grid = int(round((attention_s.shape[-1] - 1) ** 0.5))
            attention_t = resize_patch_attention(attention_t, grid, nonnegative=self.params.head_aggregation)
        if self.params.head_aggregation:
            attention_s = aggregate_heads(attention_s, self.params.aggregation_temperature)
            attention_t = aggregate_heads(attention_t, self.params.aggregation_temperature)
        elif attention_s.shape[1] != attention_t.shape[1]:
            raise UsageError(f"attndistill: {attention_t.shape[1]} teacher heads vs {attention_s.shape[1]} student heads",
                             hint="set method.params.head_aggregation=true")
        return cls_loss, attention_kl(attention_s, attention_t)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        student_tokens, student_attn, teacher_tokens, teacher_attn = self._taps
        student, teacher = inputs.student_taps[0], inputs.teacher_outputs[0]
        cls_loss, attn_loss = self.terms(student[student_tokens], student[student_attn][:, :, 0],
                                         teacher[teacher_tokens], teacher[teacher_attn][:, :, 0])
        loss = self.params.weight_cls * cls_loss + self.params.weight_attn * attn_loss
        return loss, {"cls_mse": cls_loss.detach(), "attn_kl": attn_loss.detach()}
