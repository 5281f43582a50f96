"""EGA (Ma et al., BMVC 2022): align the Pearson-correlation graphs of a teacher batch and a student batch.

The teacher and student embeddings of one batch are stacked into a 2B × D matrix whose row-wise Pearson
correlation matrix C splits into the teacher graph C[tt], the student graph C[ss] and the teacher–student
node block C[ts]. The student learns to make C[ts] the identity (each image correlates with its own teacher
embedding only) and C[ss] equal to C[tt] (the same graph edges).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillctl.methods.base import Method, MethodInputs, MethodView, Requirements, register
from distillctl.methods.domains import CropScale
from distillctl.methods.presets import PublishedRecipe
from distillctl.methods.shared import CropParams, TeacherFeature, at_least_float32, crop_view, teacher_target


class EGAParams(CropParams):
    node_weight: float = Field(0.8, ge=0)  # -node: weight of ‖C[ts] − I‖_F
    edge_weight: float = Field(0.24, ge=0)  # -edge: weight of ‖C[tt] − C[ss]‖_F (scripts/ega_seq.sh uses 0.3)
    joint_dim: int = Field(256, ge=2)  # --feature_dim: the joint space both linear layers map to
    # identity: the teacher embedding is the joint space (student linear to its dim); fixed: a random linear
    # layer to joint_dim that EGA never trains (the official teacher layer gets no EGA gradient, only its own
    # supervised CE, unavailable here); trained: a linear layer trained by EGA together with the student's.
    teacher_head: Literal["identity", "fixed", "trained"] = "identity"
    teacher_feature: TeacherFeature = "auto"  # auto: the projection when the teacher has one (CLIP's encode_image)
    # other_view: the teacher sees its own random crop/flip of the image (the official loader draws the CLIP
    # view independently); same_view: both see the student's tensor
    teacher_input: Literal["other_view", "same_view"] = "other_view"
    # RandomCrop(32, padding=4) + flip keeps 28–32 px windows of a 32-px image: ≈ area 0.77–1
    crop_scale: CropScale = (0.77, 1.0)


def pearson_matrix(rows: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between the rows of ``rows`` (N × D): centre each row over its features, scale it
    to unit length, take inner products. The 1/(D−1) covariance factor cancels against the variances."""
    centred = rows - rows.mean(dim=1, keepdim=True)
    unit = F.normalize(centred, dim=1, eps=1e-12)
    return unit @ unit.t()


def ega_loss(teacher: torch.Tensor, student: torch.Tensor, node_weight: float,
             edge_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """node_weight·‖C[ts] − I‖_F + edge_weight·‖C[tt] − C[ss]‖_F over C = pearson([teacher; student]),
    un-squared Frobenius norms (the official ``torch.norm(·, 2)`` of a matrix)."""
    batch = teacher.shape[0]
    with torch.autocast(device_type=teacher.device.type, enabled=False):  # correlations in ≥ float32
        stacked = torch.cat([at_least_float32(teacher), at_least_float32(student)])
        correlation = pearson_matrix(stacked)
    teacher_graph, student_graph = correlation[:batch, :batch], correlation[batch:, batch:]
    nodes = correlation[:batch, batch:]
    identity = torch.eye(batch, dtype=nodes.dtype, device=nodes.device)
    node = torch.linalg.matrix_norm(nodes - identity)
    edge = torch.linalg.matrix_norm(teacher_graph - student_graph)
    loss = node_weight * node + edge_weight * edge
    return loss, {"node": node.detach(), "edge": edge.detach()}


@register
class EGA(Method):
    name = "ega"
    title = "EGA: Embedding graph alignment for CLIP-to-student distillation (Ma et al., BMVC 2022)"
    objective = (
        "f_t = h_t(T(x')), f_s = W_s·S(x) in a joint space (W_s linear; h_t identity by default). C = row-wise "
        "Pearson correlation of the 2B × D stack [f_t; f_s] (each row centred over its features, then normalised). "
        "L = 0.8·‖C[ts] − I‖_F (nodes: each image correlates with its own teacher embedding only) + "
        "0.24·‖C[tt] − C[ss]‖_F (edges: the student's batch graph copies the teacher's), un-squared Frobenius norms. "
        "x' is the teacher's own crop/flip of the image (teacher_input=same_view: the student's tensor)."
    )
    published = (
        "Supervised CIFAR-100 distillation from frozen CLIP (RN50/RN101/ViT-B/32) into resnet8x4 etc. with "
        "L = CE + L_EGA; beats KD baselines on CIFAR-100, STL-10 and TinyImageNet (abstract; values not retrieved). "
        "Recipe (yccm/EGA train_student.py): SGD lr 0.05, momentum 0.9, wd 5e-4, batch 64, 240 epochs, lr ×0.1 at "
        "150/180/210; joint space 256."
    )
    sources = (
        "Official code read: yccm/EGA @ 0963f8e16cb4 (2022-12-05), distiller_zoo/EGA.py (loss), helper/loops.py, "
        "train_student.py, models/{stud,teac}_net.py, dataset/cifar100.py. Checked on identical float64 tensors "
        "(scratch harness, B ∈ {2, 7, 16}, D ∈ {5, 32, 256}): loss and gradients w.r.t. both embeddings and the "
        "student linear layer agree to ≤ 1.1e-15 relative (tolerance 1e-6). EGA has no state to update."
    )
    assumptions = (
        "Unsupervised use: L_EGA alone. The published objective adds the student's CE on CIFAR labels (γ=1), "
        "which a label-free distillation cannot use.",
        "Teacher side: identity by default. Officially the teacher's linear layer is trained by its own CE only "
        "(optimizer_t.zero_grad() discards its EGA gradient); without labels the closest choices are the "
        "teacher embedding itself (identity, nothing lost) or a fixed random map (teacher_head=fixed); "
        "teacher_head=trained lets EGA move it.",
        "Views: the official loader draws the teacher's CLIP view (RandomCrop 32 pad 4, flip, resize 224) "
        "independently of the student's; teacher_input=other_view keeps that, so the cache mode is "
        "cached_approx (cached runs replay one of the stored teacher views); same_view is cached_exact.",
        "RandomCrop(32, padding=4) is approximated by a RandomResizedCrop with area 0.77–1 (the share of the "
        "image a 28–32 px window keeps); no photometric augmentation, as published.",
        "Under DDP each rank builds the graph of its own batch (the published code is single-GPU).",
        "Argument order: the official loop calls EGA(fs, ft) on forward(ft, fs); the loss is symmetric in the "
        "swap (C[ts] ↔ C[ts]ᵀ), so it is the same value.",
    )
    Params = EGAParams
    preset_recipe = PublishedRecipe(
        source="EGA (yccm/EGA train_student.py): SGD lr 0.05, batch 64, 240 epochs on CIFAR-100 (50,000 images)",
        optimizer="sgd", lr=0.05, batch=64, published_rule="none", auto_rule="none", epochs=240,
        rule_source="the code fixes the lr at batch 64 and states no rule", dataset_images=50_000)

    def __init__(self, params: EGAParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.target_key, target_dim = teacher_target(self.name, teacher_dims, params.teacher_feature)
        joint = target_dim if params.teacher_head == "identity" else params.joint_dim
        self.student_head = nn.Linear(student_dim, joint)
        self.teacher_head: nn.Module = nn.Identity()
        if params.teacher_head != "identity":
            self.teacher_head = nn.Linear(target_dim, joint)
            self.teacher_head.requires_grad_(params.teacher_head == "trained")

    def requirements(self, image_size: int) -> Requirements:
        view = crop_view(self.params, image_size, "weak")
        if self.params.teacher_input == "same_view":
            return Requirements(views=(MethodView(view),), teacher_outputs=frozenset({self.target_key}),
                                teacher_mode="cached_exact")
        return Requirements(views=(MethodView(view, teacher=False), MethodView(view, student=False)),
                            teacher_outputs=frozenset({self.target_key}), teacher_mode="cached_approx")

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        slot = 0 if self.params.teacher_input == "same_view" else 1
        student = self.student_head(inputs.student_features[0])
        teacher = self.teacher_head(inputs.teacher_outputs[slot][self.target_key].to(student.dtype))
        return ega_loss(teacher, student, self.params.node_weight, self.params.edge_weight)
