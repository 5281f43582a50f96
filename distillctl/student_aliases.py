"""The student aliases users type, in a module without torch so ``distillctl students list`` starts at once.

:mod:`distillctl.students` re-exports both names; resolution (timm, torchvision) stays there.
"""

from __future__ import annotations

# Friendly names users type -> timm model names. Any timm name is accepted as well.
STUDENT_ALIASES: dict[str, str] = {
    "mobilenetv2": "mobilenetv2_100",
    "mobilenetv2-050": "mobilenetv2_050",
    "mobilenetv3": "mobilenetv3_large_100",
    "mobilenetv3-small": "mobilenetv3_small_100",
    "efficientnet-b0": "efficientnet_b0",
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "vit-tiny": "vit_tiny_patch16_224",
    "vit-small": "vit_small_patch16_224",
    "efficientnet-lite0": "efficientnet_lite0",
    "tiny-cnn": "test_resnet",  # timm's own tiny test network; for CPU smoke runs
    # torchvision students (timm has neither network); SqueezeNet 1.1: the 1.0 accuracy at 2.4x less compute
    "shufflenetv2": "tv:shufflenet_v2_x1_0",
    "squeezenet": "tv:squeezenet1_1",
}
TORCHVISION_PREFIXES = ("tv:", "torchvision:")
