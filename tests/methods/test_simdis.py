"""SimDis: the per-predictor BYOL losses against a loop over the published target table (7v, 2v, batch of 2,
identical views), the online teacher's own BYOL term, the EMA momentum per iteration, the view/teacher modes, and
training + bit-exact resume through the CLI, offline (frozen teacher) and online (co-trained teacher)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from distillctl.methods.base import MethodInputs, TeacherDims, cacheability
from distillctl.methods.common import cosine_momentum
from distillctl.methods.simdis import SEVEN_VIEWS, TWO_VIEWS, SimDis, SimDisParams, simdis_student_loss
from method_harness import STUDENT_DIM, TEACHER_DIMS, TinyNet, TinyTeacher, make_images, make_inputs

# predictor → (source, same view?) as in the paper's list of targets
TABLE = {"s_dv": ("own", False), "sema_sv": ("ema", True), "sema_dv": ("ema", False), "t_sv": ("t", True),
         "t_dv": ("t", False), "tema_sv": ("tema", True), "tema_dv": ("tema", False)}


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def pair_loop(p1, y1, p2, y2) -> float:
    """mean over the batch of 4 − 2(<p1_b, y1_b> + <p2_b, y2_b>), every vector made unit length."""
    total = 0.0
    for b in range(len(p1)):
        total += 4 - 2 * (sum(x * y for x, y in zip(_unit(p1[b]), _unit(y1[b])))
                          + sum(x * y for x, y in zip(_unit(p2[b]), _unit(y2[b]))))
    return total / len(p1)


def student_loss_loop(predictions: dict, sources: dict) -> float:
    total = 0.0
    for name, (p1, p2) in predictions.items():
        source, same = TABLE[name]
        v1, v2 = sources[source]
        total += pair_loop(p1, v1 if same else v2, p2, v2 if same else v1)
    return total / len(predictions)


@pytest.mark.parametrize("names,batch,identical", [(SEVEN_VIEWS, 2, False), (SEVEN_VIEWS, 5, True),
                                                   (TWO_VIEWS, 2, True), (TWO_VIEWS, 4, False)])
def test_student_loss_matches_loop(names, batch: int, identical: bool) -> None:
    generator = torch.Generator().manual_seed(batch + len(names))

    def pair():
        a = torch.nn.functional.normalize(torch.randn(batch, 3, dtype=torch.float64, generator=generator), dim=1)
        return [a, a.clone() if identical else torch.nn.functional.normalize(
            torch.randn(batch, 3, dtype=torch.float64, generator=generator), dim=1)]

    sources = {key: pair() for key in ("own", "ema", "t", "tema")}
    predictions = {name: tuple(pair()) for name in names}
    loss = simdis_student_loss(predictions, sources["own"], sources["ema"], sources["t"], sources["tema"])
    expected = student_loss_loop({k: tuple(v.tolist() for v in p) for k, p in predictions.items()},
                                 {k: [v.tolist() for v in p] for k, p in sources.items()})
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    if identical and names == TWO_VIEWS:  # same view twice: sv and dv targets coincide
        swapped = simdis_student_loss(predictions, *[[v[1], v[0]] for v in sources.values()])
        assert float(swapped) == pytest.approx(float(loss), rel=1e-12)


def _offline(**params) -> tuple[SimDis, TinyNet, TinyTeacher]:
    method = SimDis(SimDisParams(projector_hidden_dim=16, projection_dim=5, predictor_hidden_dim=16, **params),
                    STUDENT_DIM, TEACHER_DIMS).double()
    student = TinyNet(STUDENT_DIM).double()
    method.setup(student)
    return method, student, TinyTeacher().double()


def test_offline_loss_uses_teacher_projection_for_t_and_tema() -> None:
    method, student, teacher = _offline()
    assert method.target_key == "proj" and method.predictors["t_sv"].mlp[-1].out_features == TEACHER_DIMS.proj
    assert method.predictors["s_dv"].mlp[-1].out_features == 5
    images = [i.double() for i in make_images(method, 4, 16)]
    inputs = make_inputs(method, student, [teacher], images)
    loss, logs = method.loss(inputs)
    logs = {key: float(value) for key, value in logs.items()}
    with torch.no_grad():
        z = [method.head(student(img)) for img in images]
        sources = {"own": [v.tolist() for v in z], "ema": [method.target(img).tolist() for img in images],
                   "t": [teacher(img)["proj"].tolist() for img in images]}
        sources["tema"] = sources["t"]  # offline: the frozen teacher is its own EMA
        predictions = {name: (head(z[0]).tolist(), head(z[1]).tolist()) for name, head in method.predictors.items()}
    assert float(loss.detach()) == pytest.approx(student_loss_loop(predictions, sources), rel=1e-10)
    assert logs["student"] == pytest.approx(float(loss.detach()))


def test_online_adds_the_teachers_byol_loss() -> None:
    dims = TeacherDims(12, backbone=TinyNet(12, seed=3).double())
    method = SimDis(SimDisParams(online=True, predictors=TWO_VIEWS, projector_hidden_dim=16, projection_dim=5,
                                 predictor_hidden_dim=16), STUDENT_DIM, dims).double()
    student = TinyNet(STUDENT_DIM).double()
    method.setup(student)
    images = [torch.randn(4, 3, 16, 16, dtype=torch.float64) for _ in range(2)]
    outputs = [{"pooled": dims.backbone(img)} for img in images]  # the live teacher: with gradient
    inputs = MethodInputs(student_features=[student(img) for img in images], teacher_outputs=outputs, images=images,
                          index=torch.arange(4), epoch=0.0, step=0, total_epochs=2, student=student,
                          teacher=type("T", (), {"backbone": dims.backbone})(), steps_per_epoch=3)
    loss, logs = method.loss(inputs)
    logs = {key: float(value) for key, value in logs.items()}
    with torch.no_grad():
        tz = [method.teacher_head(out["pooled"]) for out in outputs]
        tema = [method.teacher_ema(img).tolist() for img in images]
        teacher_byol = pair_loop(method.teacher_predictor(tz[0]).tolist(), tema[1],
                                 method.teacher_predictor(tz[1]).tolist(), tema[0])
    assert logs["teacher"] == pytest.approx(teacher_byol, rel=1e-10)
    assert float(loss.detach()) == pytest.approx(logs["student"] + logs["teacher"], rel=1e-12)
    loss.backward()
    assert dims.backbone.body[0].weight.grad.abs().sum() > 0  # the teacher learns (its own BYOL term)
    # EMA after the step: the momentum of the next iteration, cosine over total_epochs × steps_per_epoch = 6
    before = [p.clone() for p in method.teacher_ema.module.parameters()]
    with torch.no_grad():
        for p in dims.backbone.parameters():
            p.add_(1.0)
    method.after_step(inputs)
    m = cosine_momentum(0.99, 1 / 6)
    live = list(dims.backbone.parameters()) + list(method.teacher_head.parameters())
    for old, new, src in zip(before, method.teacher_ema.module.parameters(), live):
        assert torch.allclose(new, m * old + (1 - m) * src, rtol=1e-12, atol=1e-14)


def test_modes_and_cacheability() -> None:
    method, _, _ = _offline()
    req = method.requirements(32)
    assert req.teacher_mode == "online" and req.teacher_bn == "train" and len(req.views) == 2
    assert [v.spec.family for v in req.views] == ["byol1", "byol2"] and all(v.teacher for v in req.views)
    assert cacheability(req, "eval")[0] == "no"  # two augmentation families: no one-view cache replays them
    online = SimDis(SimDisParams(online=True), STUDENT_DIM, TeacherDims(12, backbone=TinyNet(12)))
    assert online.requirements(32).teacher_mode == "co_trained" and online.target_key == "pooled"


def test_params() -> None:
    params = SimDisParams()
    assert params.predictors == SEVEN_VIEWS and (params.projection_dim, params.momentum) == (256, 0.99)
    assert not params.online
    for bad in ({"predictors": []}, {"predictors": ["s_dv", "s_dv"]}, {"predictors": ["t_xv"]}, {"momentum": 1.5}):
        with pytest.raises(ValidationError):
            SimDisParams(**bad)


def test_online_recipe_validates() -> None:
    from distillctl.config import load_recipe
    from tests.conftest import REPO

    recipe = load_recipe(str(REPO / "recipes" / "simdis-online_cpu.yaml"))
    params = SimDisParams(**recipe.method.params)
    assert params.online and recipe.teacher.source == "scratch" and recipe.teacher.arch
    assert recipe.data.train == "builtin:digits"


@pytest.mark.slow
def test_trains_and_resumes_exactly(tmp_path, tiny_teacher_file) -> None:
    from pooled_e2e import train_and_resume

    train_and_resume(tmp_path, tiny_teacher_file, "simdis", ["--set", "method.params.projector_hidden_dim=32",
                                                             "--set", "method.params.predictor_hidden_dim=32"])


@pytest.mark.slow
def test_online_trains_and_resumes_exactly(tmp_path) -> None:
    from cotrained_e2e import train_and_resume

    rows = train_and_resume(tmp_path, "simdis", ["--set", "method.params.online=true",
                                                 "--set", "method.params.projector_hidden_dim=32",
                                                 "--set", "method.params.predictor_hidden_dim=32"])
    assert all(math.isfinite(row["teacher"]) for row in rows)
