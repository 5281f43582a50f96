"""Every registered method: metadata, requirements, a finite differentiable loss, a loss that falls under a
few optimiser steps, state (queues, EMA, centres) that survives state_dict → fresh instance exactly,
and Params that reject unknown keys. New methods are covered without a new test."""

from __future__ import annotations

import re

import pytest
import torch
from pydantic import ValidationError

from distillctl.methods.base import Method, TeacherDims, registry
from method_harness import (STUDENT_DIM, TEACHER_DIMS, TinyNet, TinyTeacher, hand_artifact, make_images, make_inputs,
                            tiny_vit)

METHODS = sorted(registry())
# Shrink the published sizes so every method runs on tiny tensors.
TINY_OVERRIDES = {"queue_size": 16, "hidden_dim": 16, "projector_hidden_dim": 16, "predictor_hidden_dim": 16,
                  "projection_dim": 8, "out_dim": 16, "bottleneck_dim": 8, "local_crops": 2, "small_crops": 2}
MULTI_TEACHER_DIMS = [TeacherDims(pooled=12, proj=6), TeacherDims(pooled=10, proj=4)]
IMAGE_SIZE = 24
BATCH = 6


def tiny_params(cls: type[Method]) -> dict:
    fields = cls.Params.model_fields
    params = {key: value for key, value in TINY_OVERRIDES.items() if key in fields}
    if "out_dim" in params and "dino" in cls.name:
        params["out_dim"] = 16
    return params


def teacher_dims_for(cls: type[Method]):
    if cls.kind == "ssl":
        return None
    return MULTI_TEACHER_DIMS if cls.name == "simreg-multi" else TEACHER_DIMS


def teachers_for(cls: type[Method]) -> list[TinyTeacher] | None:
    if cls.kind == "ssl":
        return None
    if cls.name == "simreg-multi":
        return [TinyTeacher(MULTI_TEACHER_DIMS[0], seed=1), TinyTeacher(MULTI_TEACHER_DIMS[1], seed=2)]
    return [TinyTeacher(vit=getattr(cls, "vit_only", False))]


def build(name: str, student_seed: int = 0) -> tuple[Method, TinyNet]:
    cls = registry()[name]
    teacher_dims = teacher_dims_for(cls)
    if getattr(cls, "vit_only", False) and teacher_dims is not None:  # ViT-only methods: tiny timm ViTs on both
        teacher_dims = TeacherDims(TEACHER_DIMS.pooled, TEACHER_DIMS.proj,  # sides (teachers_for builds the same one)
                                   backbone=TinyTeacher(vit=True).backbone)
    method = cls(cls.Params(**tiny_params(cls)), STUDENT_DIM, teacher_dims)
    student = tiny_vit(STUDENT_DIM, seed=student_seed) if getattr(cls, "vit_only", False) else TinyNet(STUDENT_DIM, seed=student_seed)
    hand_artifact(method, BATCH)  # noroozi-kt, rekd: the offline teacher table the pipeline hands over
    method.setup(student)
    return method, student


@pytest.mark.parametrize("name", METHODS)
def test_metadata_and_requirements(name: str) -> None:
    cls = registry()[name]
    for attribute in ("name", "title", "objective", "published"):
        assert isinstance(getattr(cls, attribute), str) and getattr(cls, attribute).strip()
    cls.Params()  # every published default validates
    with pytest.raises(ValidationError):
        cls.Params(definitely_not_a_parameter=1)
    method, _ = build(name)
    req = method.requirements(IMAGE_SIZE)
    assert req.views, "a method needs at least one view"
    # the student trains on a trainer forward, or the method runs it itself inside loss() (MAE's masked pass)
    assert any(view.student for view in req.views) != cls.own_forwards
    assert req.teacher_bn in ("eval", "train")
    if cls.kind == "ssl":
        assert req.teacher_outputs == frozenset() and req.teacher_mode == "none"
        assert not any(view.teacher for view in req.views)
    elif cls.own_forwards:  # mae-lite: its teacher runs inside loss() on the student's visible tokens
        assert req.teacher_outputs == frozenset() and req.teacher_mode == "online"
        assert not any(view.teacher for view in req.views)
    else:
        assert req.teacher_outputs and req.teacher_mode in ("cached_exact", "cached_approx", "online", "co_trained")
        # a method trained on an offline teacher artefact (noroozi-kt, rekd) reads the teacher before step 0 only
        assert any(view.teacher for view in req.views) or hasattr(method, "teacher_artifact")
        for key in req.teacher_outputs:  # plain outputs, or <output>_<k> for multi-teacher methods
            assert key in ("pooled", "proj") or re.fullmatch(r"(pooled|proj)_\d+", key), key
    if "teacher_bn" in cls.Params.model_fields:  # the documented default is what the method declares
        assert req.teacher_bn == cls.Params().teacher_bn


@pytest.mark.parametrize("name", METHODS)
def test_loss_is_finite_scalar_with_gradient_and_falls(name: str) -> None:
    torch.manual_seed(0)
    method, student = build(name)
    teachers = teachers_for(registry()[name])
    images = make_images(method, BATCH, IMAGE_SIZE, seed=3)
    loss, logs = method.loss(make_inputs(method, student, teachers, images, step=5, epoch=12.0, total_epochs=20))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    # logs stay on the device (the trainer reads them at log steps only): detached 0-dim tensors or floats
    assert all(isinstance(v, float) or (isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad)
               for v in logs.values())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())

    parameters = list(student.parameters()) + method.trainable_parameters()
    optimizer = torch.optim.Adam(parameters, lr=3e-3)
    losses = []
    for _ in range(8):  # fixed batch, fixed step (same CutMix), state updates held back
        loss, _ = method.loss(make_inputs(method, student, teachers, images, step=5, epoch=12.0, total_epochs=20))
        losses.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", METHODS)
def test_state_survives_state_dict_round_trip(name: str) -> None:
    method, student = build(name)
    teachers = teachers_for(registry()[name])
    for step in range(3):  # move queues / EMA / centres away from their initial values
        inputs = make_inputs(method, student, teachers, make_images(method, BATCH, IMAGE_SIZE, seed=step), step=step,
                             epoch=step * 0.5, total_epochs=4)
        method.loss(inputs)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01)
        method.after_step(inputs)
    state = method.state_dict()
    fresh, _ = build(name, student_seed=7)
    fresh.load_state_dict(state)  # strict: same keys
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    method.eval(), fresh.eval()
    probe = make_inputs(method, student, teachers, make_images(method, BATCH, IMAGE_SIZE, seed=9), step=4, epoch=2.0,
                        total_epochs=4)
    with torch.no_grad():
        assert torch.equal(method.loss(probe)[0], fresh.loss(probe)[0])


@pytest.mark.parametrize("name", METHODS)
def test_loss_under_bf16_autocast(name: str) -> None:
    """AMP: every loss stays finite under bf16 autocast, and its state updates accept the mixed dtypes."""
    method, student = build(name)
    teachers = teachers_for(registry()[name])
    images = make_images(method, BATCH, IMAGE_SIZE, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = make_inputs(method, student, teachers, images, step=1, epoch=12.0, total_epochs=20)
        loss, _ = method.loss(inputs)
    assert torch.isfinite(loss)
    loss.backward()
    method.after_step(inputs)


def test_low_temperature_similarities_stay_float32_under_autocast() -> None:
    """CompRess (τ=0.04) computes its similarity logits in float32 even when autocast asks for bf16."""
    method, student = build("compress-1q")
    teachers = teachers_for(registry()["compress-1q"])
    images = make_images(method, BATCH, IMAGE_SIZE, seed=5)
    with torch.no_grad():
        reference, _ = method.loss(make_inputs(method, student, teachers, images))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed, _ = method.loss(make_inputs(method, student, teachers, images))
    assert mixed.dtype == torch.float32
    assert float(mixed) == pytest.approx(float(reference), rel=0.05)
