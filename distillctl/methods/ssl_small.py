"""ssl-small (Shi et al., AAAI 2022): MoCo v2 with the recipe tuned for small students, no teacher."""

from __future__ import annotations

from distillctl.methods.base import register
from distillctl.methods.domains import Augmentation, Count, Positive
from distillctl.methods.mocov2 import MocoV2, MocoV2Params


class SslSmallParams(MocoV2Params):
    temperature: Positive = 0.1
    hidden_dim: Count | None = None  # None: 2 × the student's feature dim (the "wide" head)
    symmetric: bool = False  # one InfoNCE term per step, as in MoCo v2 / main_moco_final.py
    augmentation: Augmentation = "ssl-small"  # stronger colour jitter (--cj 1), grayscale, blur


@register
class SslSmall(MocoV2):
    name = "ssl-small"
    kind = "ssl"
    title = "On the efficacy of small self-supervised contrastive models without distillation signals (Shi et al., AAAI 2022)"
    objective = (
        "Plain MoCo v2 with the small-model recipe: wide projection head Linear(d,2d)–ReLU–Linear(2d,128), "
        "τ = 0.1, K = 65536, m = 0.999, stronger colour jitter; queries q = n(g(S(x1))), keys from the EMA encoder, "
        "InfoNCE over [q·k+, q·Q]/τ (negatives=batch: Q = the batch's other keys). No teacher: the 'student trained alone' reference."
    )
    published = (
        "ImageNet linear, baseline → improved 200ep / 800ep (WOWNICE/ssl-small): MobileNetV3-Small 26.8 → 41.3 / 41.0, "
        "EfficientNet-B0 42.1 → 51.2 / 55.9, MobileNetV3-L 32.2 → 48.7 / 47.9, ResNet-18 51.0 → 49.7 / 55.7, "
        "DeiT-Tiny 23.4 → 33.1 / 38.6. Recipe: batch 512, lr 0.06, cosine, 800 epochs (trained from scratch here; "
        "the README command restarts from a SEED-distilled checkpoint)."
    )
    Params = SslSmallParams

    def __init__(self, params: SslSmallParams, student_dim: int, teacher_dims=None) -> None:
        wide = params.model_copy(update={"hidden_dim": params.hidden_dim or 2 * student_dim})
        super().__init__(wide, student_dim, teacher_dims)
