"""EGA: the loss against a loop-based Pearson/Frobenius computation, view layout and cache modes, the teacher-side
head options, and training + bit-exact resume through the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from distillctl.methods.ega import EGA, EGAParams, ega_loss, pearson_matrix
from method_harness import STUDENT_DIM, TEACHER_DIMS, TinyNet, TinyTeacher, make_images, make_inputs


def pearson_loop(a: list[float], b: list[float]) -> float:
    """Textbook Pearson r of two equally long sequences."""
    n = len(a)
    mean_a, mean_b = sum(a) / n, sum(b) / n
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b)) / (n - 1)
    var_a = sum((x - mean_a) ** 2 for x in a) / (n - 1)
    var_b = sum((y - mean_b) ** 2 for y in b) / (n - 1)
    return cov / math.sqrt(var_a * var_b)


def ega_loop(teacher: list[list[float]], student: list[list[float]], node_w: float, edge_w: float) -> float:
    n = len(teacher)
    node = sum((pearson_loop(teacher[i], student[j]) - (1.0 if i == j else 0.0)) ** 2
               for i in range(n) for j in range(n))
    edge = sum((pearson_loop(teacher[i], teacher[j]) - pearson_loop(student[i], student[j])) ** 2
               for i in range(n) for j in range(n))
    return node_w * math.sqrt(node) + edge_w * math.sqrt(edge)


@pytest.mark.parametrize("batch,dim", [(2, 3), (2, 9), (5, 4), (9, 17)])
def test_loss_matches_loop(batch: int, dim: int) -> None:
    generator = torch.Generator().manual_seed(batch * 31 + dim)
    teacher = torch.randn(batch, dim, dtype=torch.float64, generator=generator)
    student = torch.randn(batch, dim, dtype=torch.float64, generator=generator)
    loss, logs = ega_loss(teacher, student, 0.8, 0.24)
    assert float(loss) == pytest.approx(ega_loop(teacher.tolist(), student.tolist(), 0.8, 0.24), rel=1e-12)
    assert 0.8 * logs["node"] + 0.24 * logs["edge"] == pytest.approx(float(loss), rel=1e-12)


def test_pearson_is_scale_and_shift_invariant_per_row() -> None:
    rows = torch.randn(4, 6, dtype=torch.float64)
    moved = rows * torch.tensor([[2.0], [0.5], [3.0], [1.0]], dtype=torch.float64) + torch.tensor([[1.0], [-4.0], [0.0], [9.0]], dtype=torch.float64)
    assert torch.allclose(pearson_matrix(rows), pearson_matrix(moved), atol=1e-12)
    assert torch.allclose(torch.diagonal(pearson_matrix(rows)), torch.ones(4, dtype=torch.float64))


def test_loss_is_zero_when_student_copies_teacher_up_to_affine_maps_and_batch_is_orthogonal() -> None:
    # rows with zero mean and orthogonal directions: C[tt] = I, so a student equal to 3·t + 1 gives 0 loss
    teacher = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]], dtype=torch.float64)
    loss, logs = ega_loss(teacher, 3 * teacher + 1, 0.8, 0.24)
    assert float(loss) == pytest.approx(0.0, abs=1e-12)
    assert logs["node"] == pytest.approx(0.0, abs=1e-12) and logs["edge"] == pytest.approx(0.0, abs=1e-12)


def test_method_loss_uses_heads_and_teacher_view() -> None:
    method = EGA(EGAParams(teacher_head="fixed", joint_dim=5), STUDENT_DIM, TEACHER_DIMS).double()
    student, teacher = TinyNet(STUDENT_DIM).double(), TinyTeacher().double()
    images = [i.double() for i in make_images(method, 3, 16)]
    inputs = make_inputs(method, student, [teacher], images)
    assert inputs.teacher_outputs[0] is None and inputs.teacher_outputs[1] is not None  # teacher: its own view
    loss, _ = method.loss(inputs)
    s = method.student_head(student(images[0])).tolist()
    t = method.teacher_head(teacher(images[1])["proj"]).tolist()
    assert float(loss.detach()) == pytest.approx(ega_loop(t, s, 0.8, 0.24), rel=1e-12)
    loss.backward()
    assert method.teacher_head.weight.grad is None  # "fixed": EGA never trains the teacher side
    assert all(p is not method.teacher_head.weight for p in method.trainable_parameters())
    assert method.student_head.weight.grad.abs().sum() > 0


def test_teacher_head_choices_and_cache_modes() -> None:
    identity = EGA(EGAParams(), STUDENT_DIM, TEACHER_DIMS)
    assert identity.student_head.out_features == TEACHER_DIMS.proj and isinstance(identity.teacher_head, torch.nn.Identity)
    trained = EGA(EGAParams(teacher_head="trained", joint_dim=4), STUDENT_DIM, TEACHER_DIMS)
    assert trained.teacher_head.weight.requires_grad and trained.student_head.out_features == 4
    assert identity.requirements(32).teacher_mode == "cached_approx"
    same = EGA(EGAParams(teacher_input="same_view"), STUDENT_DIM, TEACHER_DIMS).requirements(32)
    assert same.teacher_mode == "cached_exact" and len(same.views) == 1
    backbone = EGA(EGAParams(teacher_feature="backbone"), STUDENT_DIM, TEACHER_DIMS)
    assert backbone.target_key == "pooled" and backbone.student_head.out_features == TEACHER_DIMS.pooled


def test_params_defaults_and_domains() -> None:
    params = EGAParams()
    assert (params.node_weight, params.edge_weight, params.joint_dim) == (0.8, 0.24, 256)
    for bad in ({"node_weight": -1}, {"joint_dim": 1}, {"teacher_head": "mlp"}, {"nodes": 1}):
        with pytest.raises(ValidationError):
            EGAParams(**bad)


@pytest.mark.slow
def test_trains_and_resumes_exactly(tmp_path, tiny_teacher_file) -> None:
    from pooled_e2e import train_and_resume

    train_and_resume(tmp_path, tiny_teacher_file, "ega", [])  # auto: cached (the teacher view replayed from the cache)


def test_recipes_validate() -> None:
    from pooled_e2e import check_recipes

    check_recipes("ega")
