"""Shared test scaffolding for tests/methods: tiny student/teacher networks and MethodInputs builders.

Kept framework-free (no trainer): views are random tensors of the sizes a method requests, the
teacher is a frozen random CNN, the student a tiny CNN, so each test runs in well under a second.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from distillctl.methods.base import Method, MethodInputs, TeacherDims
from distillctl.taps import TapRecorder
from distillctl.train.forward import student_forward

STUDENT_DIM = 8
# backbone: what dense methods read their map geometry from (TinyNet's one stage: 8 channels)
TEACHER_DIMS = TeacherDims(pooled=12, proj=6,
                           backbone=SimpleNamespace(feature_info=[{"module": "body.2", "num_chs": 8, "reduction": 1}]))


class TinyNet(nn.Module):
    """conv–BN–ReLU–pool–linear; a stand-in backbone returning pooled features."""

    def __init__(self, out_dim: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, out_dim))
        self.num_features = out_dim
        # one timm-style stage (the B×8×H×W map after the ReLU), so dense methods can tap "stage:-1"
        self.feature_info = [{"module": "body.2", "num_chs": 8, "reduction": 1}]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def tiny_vit(dim: int, seed: int = 0) -> nn.Module:
    """A one-block timm ViT (2 heads, 8-px patches, 24 px inputs: a 3x3 grid) for ViT-only methods."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, embed_dim=dim, depth=1, num_heads=2, patch_size=8,
                             img_size=24)


class TinyTeacher(nn.Module):
    """Frozen random teacher with a pooled feature and a projection output (``vit``: a tiny ViT backbone)."""

    def __init__(self, dims: TeacherDims = TEACHER_DIMS, seed: int = 1, vit: bool = False) -> None:
        super().__init__()
        self.backbone = tiny_vit(dims.pooled, seed) if vit else TinyNet(dims.pooled, seed=seed)
        self.proj = nn.Linear(dims.pooled, dims.proj) if dims.proj else None
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.backbone(images)
        out = {"pooled": pooled}
        if self.proj is not None:
            out["proj"] = self.proj(pooled)
        return out


def make_images(method: Method, batch: int, image_size: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    views = method.requirements(image_size).views
    return [torch.randn(batch, 3, v.spec.size, v.spec.size, generator=generator) for v in views]


def teacher_outputs_for(method: Method, images: list[torch.Tensor],
                        teachers: list[TinyTeacher]) -> list[dict[str, torch.Tensor] | None]:
    """Per view: the requested teacher outputs; keys ``name_k`` come from teacher k (multi-teacher); teacher
    taps (dense methods) recorded from teacher 0's backbone forward."""

    req = method.requirements(images[0].shape[-1])
    outputs: list[dict[str, torch.Tensor] | None] = []
    for view, img in zip(req.views, images):
        if not view.teacher:
            outputs.append(None)
            continue
        out: dict[str, torch.Tensor] = {}
        for key in req.teacher_outputs:
            name, _, k = key.partition("_")
            out[key] = teachers[int(k) if k else 0](img)[name]
        if req.teacher_taps:
            with torch.no_grad(), TapRecorder(teachers[0].backbone, req.teacher_taps) as recorder:
                teachers[0].backbone(img)
                out.update(recorder.take())
        outputs.append(out)
    return outputs


def make_inputs(method: Method, student: nn.Module, teachers: list[TinyTeacher] | None, images: list[torch.Tensor],
                step: int = 0, epoch: float = 0.0, total_epochs: int = 10, index: torch.Tensor | None = None,
                ) -> MethodInputs:
    req = method.requirements(images[0].shape[-1])
    # the trainer's forward: one call per view, or per resolution group for methods that group their views
    slots = [i for i, view in enumerate(req.views) if view.student]
    with TapRecorder(student, req.student_taps) as recorder:
        student_features, student_taps = student_forward(student, recorder, req, images, slots)
    teacher = teacher_outputs_for(method, images, teachers) if teachers else [None] * len(images)
    batch = images[0].shape[0]
    return MethodInputs(student_features=student_features, teacher_outputs=teacher, images=images,
                        index=index if index is not None else torch.arange(batch), epoch=epoch, step=step,
                        total_epochs=total_epochs, student=student, student_taps=student_taps)


def artifact_table(method: Method, num_samples: int) -> torch.Tensor:
    """A small stand-in for the offline teacher artefact a method declares (``teacher_artifact``): k-means labels
    cycling over three clusters, or each row's next ``k`` rows as its nearest neighbours."""
    wanted = method.teacher_artifact()
    rows = torch.arange(num_samples)
    if wanted.kind == "kmeans":
        return rows % min(3, wanted.size)
    return torch.stack([(rows + shift) % num_samples for shift in range(1, wanted.size + 1)], dim=1)


def hand_artifact(method: Method, num_samples: int) -> None:
    """What the pipeline does before ``setup`` for methods trained on an offline teacher artefact."""
    if hasattr(method, "teacher_artifact"):
        method.num_samples = num_samples
        method.use_artifact(artifact_table(method, num_samples))
