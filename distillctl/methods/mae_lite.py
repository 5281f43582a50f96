"""MAE pre-training of a ViT (``pretrain --method mae``) and MAE-lite's distillation form (``mae-lite``).

MAE-lite (Wang et al., ICML 2023; arXiv 2205.14443): MAE recipes for ViT-Tiny, and optionally the attention maps
of a larger MAE teacher distilled into the student *during* MAE pre-training. The teacher encoder runs on the same
visible tokens (the student's masking permutation); a bias-free 1×1 convolution over the head dimension maps the
student's attention maps of a chosen block to the teacher's head count; the loss adds their MSE to the MAE loss.

The masked encoder forward runs here, inside the method, on the student backbone the trainer passes in
(``MethodInputs.student``): it is the forward that trains the student, and the attention maps are recorded from
it with the ``attn:<b>`` tap hook (no second pass). The view is therefore declared ``student=False`` (and, for
MAE-lite, ``teacher=False``): the trainer runs no unmasked student or teacher forward of its own, which would be
unused work (a ViT without dropout or BatchNorm, so skipping them leaves every loss and weight unchanged).
"""

from __future__ import annotations

from functools import partial
from contextlib import contextmanager
from typing import ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillctl.errors import UsageError
from distillctl.methods.base import Method, MethodInputs, MethodParams, MethodView, Requirements, register
from distillctl.methods.domains import AreaFraction, Count, CropScale, NonNegative
from distillctl.methods.shared import CropParams, crop_view, step_rng
from distillctl.taps import attention_logits


class MAEParams(CropParams):
    mask_ratio: AreaFraction = 0.75  # fraction of patches removed (mae_lite_exp.py)
    decoder_dim: Count = 96  # mae_vit_tiny_patch16: decoder 96-d, 1 block, 3 heads
    decoder_depth: Count = 1
    decoder_heads: Count = 3
    norm_pix_loss: bool = True  # per-patch normalised pixel targets (mean/var, eps 1e-6)
    crop_scale: CropScale = (0.08, 1.0)  # RandomResizedCrop(0.08–1) + flip


class MAELiteParams(MAEParams):
    attn_weight: NonNegative = 1.0  # distill_attn_alpha
    attention: str = Field("attn:-1", pattern=r"^attn:-?\d+$")  # distill_attn_idx (12,) = the last block
    # the official AttnCatcher hooks Attention.identity, which sits *before* the softmax: logits q·kᵀ·scale
    attention_form: Literal["logits", "probabilities"] = "logits"


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(1 + grid², dim) fixed 2-D sine-cosine embedding with a zero CLS row: the first half of the channels
    encodes the column (x), the second the row (y), each as [sin(p·ω), cos(p·ω)], ω_k = 10000^(-k/(dim/4))."""
    if dim % 4:
        raise UsageError(f"mae: decoder_dim {dim} must be a multiple of 4 (2-D sine-cosine embedding)")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.flatten()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) → (B, L, p·p·3), patches in row-major order, pixels (row, column, channel) inside each."""
    batch, channels, height, width = images.shape
    x = images.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(batch, (height // patch) * (width // patch), patch * patch * channels)


def mae_reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                            normalise: bool) -> torch.Tensor:
    """Mean over removed patches of the per-patch mean squared error; targets standardised per patch if asked."""
    if normalise:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((prediction - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def random_keep(batch: int, patches: int, ratio: float, step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_shuffle, ids_restore) of a per-sample random permutation, from the step's own generator (exact resume)."""
    noise = torch.from_numpy(step_rng(step, salt=0x3AE).random((batch, patches))).to(device)
    ids_shuffle = torch.argsort(noise, dim=1)
    return ids_shuffle, torch.argsort(ids_shuffle, dim=1)


def check_mae_vit(model: nn.Module, who: str) -> None:
    """A timm ViT with a CLS token, learned/fixed absolute position embeddings covering it, and no registers."""
    if not all(hasattr(model, name) for name in ("patch_embed", "blocks", "pos_embed", "cls_token")) \
            or model.cls_token is None or model.pos_embed is None:
        raise UsageError(f"mae: the {who} must be a timm ViT with a CLS token and absolute position embeddings",
                         hint="e.g. vit_tiny_patch16_224 (set student.kwargs.num_heads=12 for MAE-lite's ViT-Tiny)")
    if getattr(model, "no_embed_class", False) or int(getattr(model, "num_prefix_tokens", 1)) != 1:
        raise UsageError(f"mae: the {who} has register tokens or a CLS token outside its position embedding")


@contextmanager
def recording_attention(model: nn.Module, block: int | None) -> Iterator[dict[str, torch.Tensor]]:
    """Record q·kᵀ·scale of ``model.blocks[block]`` (B×heads×N×N, before the softmax) during the enclosed forward
    into the yielded dict under ``"logits"``; ``block=None`` records nothing."""
    store: dict[str, torch.Tensor] = {}
    if block is None:
        yield store
        return
    attention = model.blocks[block].attn
    handle = attention.qkv.register_forward_hook(
        lambda _module, _inputs, qkv: store.__setitem__("logits", attention_logits(attention, qkv)))
    try:
        yield store
    finally:
        handle.remove()


def masked_encode(model: nn.Module, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """MAE's encoder pass on a timm ViT: patch embed + position embedding, keep ``ids_keep``, prepend the CLS
    token (+ its position embedding), blocks, final norm. Returns (B, 1 + kept, D)."""
    tokens = model.patch_embed(images)
    if tokens.ndim == 4:  # dynamic-size ViTs return NHWC
        tokens = tokens.flatten(1, 2)
    position = model.pos_embed
    if position.shape[1] != tokens.shape[1] + 1:
        raise UsageError(f"mae: {tokens.shape[1]} patches but {position.shape[1] - 1} position embeddings")
    tokens = tokens + position[:, 1:]
    tokens = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
    cls = (model.cls_token + position[:, :1]).expand(tokens.shape[0], -1, -1)
    x = model.norm_pre(torch.cat([cls, tokens], dim=1))
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


class MAEDecoder(nn.Module):
    """MAE's light decoder: embed, mask tokens at removed positions, fixed 2-D sin-cos positions, blocks, norm,
    per-patch pixel prediction (CLS row dropped)."""

    def __init__(self, encoder_dim: int, grid: int, patch: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos_embed", sincos_2d(dim, grid)[None])
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True,
                                          norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch * patch * 3)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)
        masked = self.mask_token.expand(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


@register
class MAE(Method):
    name = "mae"
    title = "MAE: Masked autoencoders are scalable vision learners (He et al., CVPR 2022), MAE-lite's ViT-Tiny recipe"
    objective = (
        "L = mean over removed patches of ‖D(E(x_visible))_i − norm(x_i)‖² / (p²·3): 75% of the patches are removed "
        "per image (random permutation), the ViT encoder E sees the rest plus CLS, the light decoder D (mask tokens, "
        "fixed 2-D sin-cos positions) predicts every patch's pixels, targets standardised per patch."
    )
    published = (
        "MAE-lite (ICML 2023) MAE-Tiny: ImageNet fine-tuning top-1 78.0 after 400 epochs of MAE pre-training "
        "(79.0 with relative position encoding at fine-tuning); linear-probe numbers are low (not retrieved)."
    )
    sources = (
        "Official code read: wangsr126/mae-lite @ f3090d4 (2023-05-23), projects/mae_lite/models_mae.py "
        "(random_masking, forward_encoder/decoder/loss, patchify, mae_vit_tiny_patch16: 12 heads, decoder 96-d × 1 "
        "block × 3 heads), mae_lite_exp.py (mask 0.75, norm_pix_loss, AdamW (0.9, 0.95), wd 0.05, 1.5e-4 per 256, "
        "40 warm-up epochs, RandomResizedCrop(0.08–1) + flip)."
    )
    assumptions = (
        "Masking noise comes from a per-step generator (step, rank), so a resumed run masks exactly as the "
        "uninterrupted one (officially torch.rand).",
    )
    Params: ClassVar[type[MethodParams]] = MAEParams
    kind: ClassVar[str] = "ssl"
    vit_only: ClassVar[bool] = True
    own_forwards: ClassVar[bool] = True  # the masked encoder pass in loss() is the student's forward

    def __init__(self, params: MAEParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.decoder: nn.Module = nn.Identity()
        self.patch = 0

    def setup(self, student: nn.Module) -> None:
        check_mae_vit(student, "student")
        grid = student.patch_embed.grid_size
        if grid[0] != grid[1]:
            raise UsageError(f"mae: the student's patch grid {grid} is not square")
        self.patch = int(student.patch_embed.patch_size[0])
        self.decoder = MAEDecoder(student.num_features, int(grid[0]), self.patch, self.params.decoder_dim,
                                  self.params.decoder_depth, self.params.decoder_heads)

    def requirements(self, image_size: int) -> Requirements:
        view = crop_view(self.params, image_size, "weak")
        # student=False: the masked encoder pass in loss() is the student's forward; the trainer's would be unused
        return Requirements(views=(MethodView(view, teacher=False, student=False),), teacher_outputs=frozenset(),
                            teacher_mode="none")

    def _masking(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids_keep, ids_restore, mask with 1 = removed) for this step's batch."""
        patches = (images.shape[-1] // self.patch) * (images.shape[-2] // self.patch)
        keep = int(patches * (1 - self.params.mask_ratio))
        if keep < 1:
            raise UsageError(f"mae: mask_ratio {self.params.mask_ratio} leaves no visible patch of {patches}")
        ids_shuffle, ids_restore = random_keep(images.shape[0], patches, self.params.mask_ratio, step, images.device)
        mask = torch.ones(images.shape[0], patches, device=images.device)
        mask[:, :keep] = 0
        return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)

    def reconstruction(self, student: nn.Module, images: torch.Tensor, step: int, block: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(MAE loss, ids_keep, the student's attention logits of ``block`` or None) of one masked pass."""
        ids_keep, ids_restore, mask = self._masking(images, step)
        with recording_attention(student, block) as recorded:
            latent = masked_encode(student, images, ids_keep)
        prediction = self.decoder(latent, ids_restore)
        target = patchify(images, self.patch).to(prediction.dtype)
        loss = mae_reconstruction_loss(prediction, target, mask, self.params.norm_pix_loss)
        return loss, ids_keep, recorded.get("logits")

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        if inputs.student is None:
            raise UsageError("mae needs the student network in the method inputs")
        loss, _, _ = self.reconstruction(inputs.student, inputs.images[0], inputs.step)
        return loss, {"mae": loss.detach()}


@register
class MAELite(MAE):
    name = "mae-lite"
    title = "MAE-lite: MAE pre-training of a tiny ViT with attention distillation (Wang et al., ICML 2023)"
    objective = (
        "L = L_MAE(student) + α·MSE(Conv1×1_heads(A_S^b), A_T^b): A^b are the attention maps (B×heads×(1+V)×(1+V)) "
        "of block b on the same visible tokens V (the teacher encoder runs with the student's masking), taken as the "
        "official code does before the softmax (q·kᵀ·scale; attention_form=probabilities for softmax maps); the "
        "bias-free 1×1 convolution maps the student's head count to the teacher's; α = 1, b = last."
    )
    published = (
        "MAE-Tiny + distillation from MAE ViT-B (1600 ep): ImageNet fine-tuning top-1 78.4 vs 78.0 without "
        "(mae-lite README; fine-tuning, not linear probe)."
    )
    sources = (
        "Official code read: wangsr126/mae-lite @ f3090d4, projects/mae_lite/mae_lite_distill_exp.py (teacher encoder "
        "with the student's ids_shuffle, AttnCatcher on block 12, Conv2d(heads_S, heads_T, 1, bias=False), MSELoss, "
        "α 1.0; hidden-state distillation off), projects/eval_tools/util/forward_hook.py and "
        "mae_lite/models/models_vit.py (the hooked identity sits before the softmax). Checked in a float64 scratch "
        "harness with the official MaskedAutoencoderViT (same weights and ids_shuffle): MAE loss agrees to 2e-16 "
        "relative, the distillation term (official catchers, adapter, MSELoss) and the total exactly; the decoder's "
        "fixed 2-D sin-cos table to 3e-8 (it is stored in float32, as upstream's parameter)."
    )
    assumptions = MAE.assumptions + (
        "The teacher must share the student's patch grid (same patch size and input size), as in the published "
        "ViT-B/16 → ViT-Tiny/16 pair; its encoder runs frozen under no_grad.",
        "Hidden-state distillation (off by default upstream) is not implemented.",
        "The distilled maps are the pre-softmax logits, as the official AttnCatcher records them (it hooks "
        "Attention.identity, placed before the softmax); methods.md §12 describes softmax maps, available as "
        "attention_form=probabilities.",
    )
    Params: ClassVar[type[MethodParams]] = MAELiteParams
    kind: ClassVar[str] = "distill"

    def __init__(self, params: MAELiteParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        teacher = getattr(teacher_dims, "backbone", None) if teacher_dims is not None else None
        if teacher_dims is None:
            raise UsageError("mae-lite needs an MAE ViT teacher", hint="pass --teacher mae-vitb16 --accept-license")
        self._teacher = [teacher]  # a list, so the frozen teacher is not registered (nor saved) as a submodule
        self.adapter: nn.Module = nn.Identity()

    def setup(self, student: nn.Module) -> None:
        super().setup(student)
        teacher = self._teacher[0]
        if teacher is None:
            raise UsageError("mae-lite needs the teacher network", hint="pass --teacher (a ViT)")
        check_mae_vit(teacher, "teacher")
        block = int(self.params.attention.partition(":")[2])
        student_heads, teacher_heads = student.blocks[block].attn.num_heads, teacher.blocks[block].attn.num_heads
        if tuple(teacher.patch_embed.patch_size) != tuple(student.patch_embed.patch_size):
            raise UsageError("mae-lite: teacher and student must share the patch size (same visible tokens)")
        self.adapter = nn.Conv2d(student_heads, teacher_heads, kernel_size=1, bias=False)

    def requirements(self, image_size: int) -> Requirements:
        view = crop_view(self.params, image_size, "weak")
        # the teacher runs online inside loss() on the student's visible tokens; the trainer's own unmasked student
        # and teacher forwards would be unused, so the view goes through neither
        return Requirements(views=(MethodView(view, teacher=False, student=False),), teacher_outputs=frozenset(),
                            teacher_mode="online")

    def attention_loss(self, student_attention: torch.Tensor, teacher_attention: torch.Tensor) -> torch.Tensor:
        """MSE(adapter(A_S), A_T) over batch, heads and both token axes."""
        return F.mse_loss(self.adapter(student_attention), teacher_attention.detach().to(student_attention.dtype))

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        block = int(self.params.attention.partition(":")[2])
        images = inputs.images[0]
        mae, ids_keep, student_logits = self.reconstruction(inputs.student, images, inputs.step, block)
        teacher = self._teacher[0]
        with torch.no_grad(), recording_attention(teacher, block) as recorded:
            masked_encode(teacher, images, ids_keep)
        student_attention, teacher_attention = student_logits, recorded["logits"]
        if self.params.attention_form == "probabilities":
            student_attention, teacher_attention = student_attention.softmax(-1), teacher_attention.softmax(-1)
        attention = self.attention_loss(student_attention, teacher_attention)
        loss = mae + self.params.attn_weight * attention
        return loss, {"mae": mae.detach(), "attn_mse": attention.detach()}
