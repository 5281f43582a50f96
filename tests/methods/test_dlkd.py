"""DLKD: each term against loop-based computations of its formula (batch of 2 included), the rotated views, the
label-free positive sets, the method's assembly of the terms, and training + bit-exact resume through the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from distillctl.data.views import ViewSpec, apply_view_uint8, sample_view, spec_dict
from distillctl.methods.base import MethodInputs, TeacherDims
from distillctl.methods.dlkd import DLKD, DLKDParams, align_loss, paired_contrastive, rotation_correlation_kl


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def cos(a, b) -> float:
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def align_loop(pred, teacher) -> float:
    return 2 - 2 * sum(cos(p, t) for p, t in zip(pred, teacher)) / len(pred)


def corr_loop(student, teacher, batch: int, tau: float) -> float:
    """Σ over rotated rows i of KL(softmax_j cos(t_i, t_j)/τ ‖ softmax_j cos(s_i, s_j)/τ), j over unrotated rows,
    divided by the number of rotated rows."""
    total = 0.0
    rotated = range(batch, len(student))
    for i in rotated:
        t_logits = [cos(teacher[i], teacher[j]) / tau for j in range(batch)]
        s_logits = [cos(student[i], student[j]) / tau for j in range(batch)]
        t_z = sum(math.exp(v) for v in t_logits)
        s_z = sum(math.exp(v) for v in s_logits)
        for tv, sv in zip(t_logits, s_logits):
            p, q = math.exp(tv) / t_z, math.exp(sv) / s_z
            total += p * math.log(p / q)
    return total / len(rotated)


def supcon_loop(student, teacher, groups, tau: float, eps: float = 1e-7) -> float:
    anchors = [list(map(float, v)) for v in student + teacher]
    labels = list(groups) + list(groups)
    n = len(anchors)
    total = 0.0
    for i in range(n):
        logits = [dot(anchors[i], anchors[j]) / tau for j in range(n)]
        top = max(logits)
        partition = sum(math.exp(logits[j] - top) for j in range(n) if j != i)
        positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
        total += -sum(logits[j] - top - math.log(partition + eps) for j in positives) / len(positives)
    return total / n


def unit_rows(rows: torch.Tensor) -> list[list[float]]:
    return torch.nn.functional.normalize(rows, dim=1).tolist()


@pytest.mark.parametrize("batch", [2, 3])
def test_terms_match_loops(batch: int) -> None:
    generator = torch.Generator().manual_seed(batch)
    student = torch.randn(4 * batch, 5, dtype=torch.float64, generator=generator)
    teacher = torch.randn(4 * batch, 5, dtype=torch.float64, generator=generator)
    assert float(align_loss(student, teacher)) == pytest.approx(align_loop(student.tolist(), teacher.tolist()), rel=1e-12)
    assert float(rotation_correlation_kl(student, teacher, batch, 0.5)) == pytest.approx(
        corr_loop(student.tolist(), teacher.tolist(), batch, 0.5), rel=1e-10)
    s, t = unit_rows(student), unit_rows(teacher)
    image = list(range(batch)) * 4
    got = paired_contrastive(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64),
                             torch.tensor(image), 0.07)
    assert float(got) == pytest.approx(supcon_loop(s, t, image, 0.07), rel=1e-10)
    pairs = list(range(4 * batch))
    got = paired_contrastive(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64),
                             torch.tensor(pairs), 0.07)
    assert float(got) == pytest.approx(supcon_loop(s, t, pairs, 0.07), rel=1e-10)


def test_correlation_term_is_zero_for_a_copy_and_has_no_teacher_gradient() -> None:
    teacher = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    assert float(rotation_correlation_kl(2.5 * teacher, teacher, 2, 0.5).detach()) == pytest.approx(0.0, abs=1e-12)
    student = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    rotation_correlation_kl(student, teacher, 2, 0.5).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_contrastive_eps_bounds_the_loss_when_all_anchors_are_far() -> None:
    # two anchors per group, every other anchor opposite: the shifted partition is ~e^{-2/τ}, eps dominates
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    value = paired_contrastive(a, -a, torch.tensor([0]), 0.07)
    expected = -((-2 / 0.07) - math.log(math.exp(-2 / 0.07) + 1e-7))
    assert float(value) == pytest.approx(expected, rel=1e-12)


def test_rotated_views_match_numpy_rot90() -> None:
    image = torch.arange(3 * 5 * 5, dtype=torch.uint8).view(3, 5, 5)
    for turns in range(4):
        spec = ViewSpec(size=5, family="weak", scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, quarter_turns=turns)
        params = sample_view(spec, 5, 5, np.random.default_rng(0))
        view = apply_view_uint8(image, params, spec)
        expected = np.rot90(image.permute(1, 2, 0).numpy(), turns).copy()  # the official HWC np.rot90
        assert torch.equal(view, torch.from_numpy(expected).permute(2, 0, 1))
    assert "quarter_turns" not in spec_dict(ViewSpec())  # unrotated specs keep their manifest form
    assert spec_dict(ViewSpec(quarter_turns=2))["quarter_turns"] == 2
    with pytest.raises(ValueError):
        ViewSpec(quarter_turns=4)


def test_method_assembles_weighted_terms_over_all_rotations() -> None:
    torch.manual_seed(0)
    dims = TeacherDims(pooled=6)
    method = DLKD(DLKDParams(embed_dim=4, align_hidden_factor=2), 5, dims).double()
    req = method.requirements(16)
    assert [v.spec.quarter_turns for v in req.views] == [0, 1, 2, 3] and req.teacher_mode == "cached_exact"
    assert req.forward_groups([0, 1, 2, 3]) == [[0, 1, 2, 3]]  # one 4B student forward, as the official batch
    batch = 2
    student = [torch.randn(batch, 5, dtype=torch.float64) for _ in range(4)]
    teacher = [torch.randn(batch, 6, dtype=torch.float64) for _ in range(4)]
    inputs = MethodInputs(student_features=student, teacher_outputs=[{"pooled": t} for t in teacher], images=[],
                          index=torch.arange(batch), epoch=0.0, step=0, total_epochs=1)
    loss, logs = method.loss(inputs)
    s_all, t_all = torch.cat(student), torch.cat(teacher)
    with torch.no_grad():
        align = align_loop(method.align_head(s_all).tolist(), t_all.tolist())
        corr = corr_loop(method.corr_head(s_all).tolist(), t_all.tolist(), batch, 0.5)
        con = supcon_loop(unit_rows(method.embed_student(s_all)), unit_rows(method.embed_teacher(t_all)),
                          list(range(batch)) * 4, 0.07)
    assert logs["align"] == pytest.approx(align, rel=1e-10)
    assert logs["corr"] == pytest.approx(corr, rel=1e-10)
    assert logs["contrast"] == pytest.approx(con, rel=1e-10)
    assert float(loss.detach()) == pytest.approx(50 * corr + 1 * con + 20 * align, rel=1e-10)
    assert method.align_head[0].out_features == 12  # d_s → 2·d_t → d_t here; 16·d_t by default


def test_params_defaults_and_domains() -> None:
    params = DLKDParams()
    assert (params.corr_weight, params.contrast_weight, params.align_weight) == (50.0, 1.0, 20.0)
    assert (params.corr_temperature, params.contrast_temperature, params.embed_dim) == (0.5, 0.07, 128)
    for bad in ({"corr_temperature": 0}, {"align_weight": -1}, {"embed_dim": 0}, {"contrast_positives": "class"}):
        with pytest.raises(ValidationError):
            DLKDParams(**bad)


def test_recipes_validate() -> None:
    from pooled_e2e import check_recipes

    check_recipes("dlkd", spells_defaults=False)  # the ImageNet script's weights (20 / 0.5 / 10), not CIFAR's


@pytest.mark.slow
@pytest.mark.parametrize("mode, expected", [("auto", "cached"), ("online", "online")])
def test_trains_and_resumes_exactly(tmp_path, tiny_teacher_file, mode, expected) -> None:
    """From a feature cache holding every stored crop at the four rotations (the default) and with the teacher
    online."""
    import json

    from pooled_e2e import train_and_resume

    train_and_resume(tmp_path, tiny_teacher_file, "dlkd",
                     ["--set", "method.params.align_hidden_factor=2", "--teacher-mode", mode])
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["teacher"]["mode"] == expected
    cache = tmp_path / "full" / "cache"
    if expected == "cached":
        manifest = json.loads((cache / "manifest.json").read_text())
        assert manifest["transform"]["turns"] == 4 and "quarter_turns" not in manifest["transform"]["spec"]
        assert manifest["views"] == 4 * 4  # --cache-views 4 (the default) crops x 4 rotations
        # the run records the cache stage under the cache's own key (rotations included)
        stages = json.loads((tmp_path / "full" / "manifest.json").read_text())["stages"]
        assert stages["cache"]["fingerprint"] == manifest["fingerprint"]
    else:
        assert not cache.exists()
