"""``teacher.source: scratch``: a randomly initialised teacher for methods that train it with the student.

DoGo, OSS and SimDis-online co-train their teacher from scratch (``teacher_mode="co_trained"``): there is no
checkpoint to load, only an architecture (``teacher.arch``, a timm name) and an initialisation. The weights are
drawn from the run seed + 1 in a forked RNG, so the teacher differs from a student of the same architecture
(seeded with the run seed) and building it leaves the global RNG untouched. Its identity (``sha256``) is the hash
of those initial weights, so run fingerprints follow the architecture, the seed and the timm version. A frozen
random teacher teaches nothing, so the pipeline refuses ``scratch`` for methods that do not co-train it.
"""

from __future__ import annotations

import hashlib

import torch

from distillctl.errors import UsageError
from distillctl.teachers.base import Preprocess, Teacher

SCRATCH = "scratch"


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the module's state (names, shapes, dtypes and bytes, in state_dict order)."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def scratch_teacher(arch: str | None, seed: int, image_size: int, crop_pct: float | None = None) -> Teacher:
    """A randomly initialised timm backbone as a trainable teacher (no projection head: the method adds its own)."""
    from distillctl.students import create_backbone, feature_dim

    if not arch:
        raise UsageError("teacher.source: scratch needs teacher.arch (a timm architecture, e.g. resnet18)",
                         hint="e.g. --teacher scratch --teacher-arch resnet18")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        backbone = create_backbone(arch, img_size=image_size)
    return Teacher(name=f"scratch:{arch}", arch=arch, backbone=backbone, embed_dim=feature_dim(backbone),
                   sha256=weights_sha256(backbone), license="self-trained", source=SCRATCH,
                   preprocess=Preprocess(input_size=image_size, resize=None, crop_pct=crop_pct,
                                         origin="not stated (a teacher trained from scratch follows the recipe)"))
