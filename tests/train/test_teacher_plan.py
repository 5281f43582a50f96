"""The one cacheability rule (methods.base.teacher_plan): a table of declared needs × BN mode × request."""

from __future__ import annotations

import pytest

from distillctl.data.views import ViewSpec
from distillctl.errors import UsageError
from distillctl.methods.base import MethodView, Requirements, build_method, cacheability, teacher_plan
from distillctl.methods.base import TeacherDims

VIEW = MethodView(ViewSpec(size=16, family="mocov2"))
SMALL = MethodView(ViewSpec(size=8, family="mocov2"))


def req(mode="cached_exact", views=(VIEW, VIEW), taps=()) -> Requirements:
    return Requirements(views=views, teacher_mode=mode, teacher_taps=taps)


@pytest.mark.parametrize("requirements, bn, expected", [
    (req(), "eval", "cached_exact"),
    (req("cached_approx"), "eval", "cached_approx"),
    (req(), "train", "no"),  # the cache is built with eval-mode BN
    (req("cached_approx"), "train", "no"),
    (req(taps=("stage:-1",)), "eval", "cached_exact"),  # the cache stores teacher taps beside the outputs
    (req("online", taps=("attn:-1",)), "eval", "no"),  # a method declaring online stays online
    (req(views=(VIEW, SMALL)), "eval", "no"),  # two teacher augmentations, one stored spec
    (req("online"), "eval", "no"),
    (req("co_trained"), "train", "no"),
    (req("none"), "eval", "no"),
])
def test_cacheability_table(requirements, bn, expected):
    assert cacheability(requirements, bn)[0] == expected


@pytest.mark.parametrize("requirements, bn, requested, mode", [
    (req(), "eval", "auto", "cached"),
    (req(), "eval", "online", "online"),
    (req(), "eval", "cached", "cached"),
    (req(), "train", "auto", "online"),
    (req(taps=("stage:-1",)), "eval", "auto", "cached"),
    (req(taps=("stage:-1",)), "train", "auto", "online"),
    (req("online", taps=("attn:-1",)), "eval", "auto", "online"),
    (req("co_trained"), "train", "auto", "co_trained"),
    (req("co_trained"), "train", "online", "co_trained"),
    (req("none"), "eval", "cached", "none"),
])
def test_plan_table(requirements, bn, requested, mode):
    assert teacher_plan(requirements, bn, requested, "m").mode == mode


@pytest.mark.parametrize("requirements, bn, words", [
    (req(), "train", "BatchNorm runs in train mode"),
    (req("co_trained"), "train", "trains with the student"),
    (req("online"), "eval", "must run online"),
    (req(views=(VIEW, SMALL)), "eval", "2 different augmentations"),
])
def test_cached_request_that_cannot_hold_is_refused_in_one_line(requirements, bn, words):
    with pytest.raises(UsageError, match="--teacher-mode cached is not possible") as raised:
        teacher_plan(requirements, bn, "cached", "m")
    assert words in str(raised.value) and "\n" not in str(raised.value) and raised.value.exit_code == 2


def test_auto_going_online_says_why():
    plan = teacher_plan(req(), "train", "auto", "smd")
    assert plan.mode == "online" and "smd" in plan.note and "eval-mode BatchNorm" in plan.note


@pytest.mark.parametrize("name", ["smd", "compress-1q", "compress-2q", "mse-reg", "cosine-reg"])
def test_methods_that_claimed_cached_exact_under_train_bn_go_online(name):
    """Regression: SMD, CompRess and the regression baselines declared cached_exact with teacher_bn=train
    while the cache is built with eval-mode BN; the rule now refuses the cache for them."""
    method = build_method(name, {"teacher_bn": "train"}, 8, TeacherDims(12, 6))
    requirements = method.requirements(16)
    assert teacher_plan(requirements, requirements.teacher_bn, "auto", name).mode == "online"
    with pytest.raises(UsageError, match="eval-mode BatchNorm"):
        teacher_plan(requirements, requirements.teacher_bn, "cached", name)
    eval_requirements = build_method(name, {"teacher_bn": "eval"}, 8, TeacherDims(12, 6)).requirements(16)
    assert teacher_plan(eval_requirements, "eval", "auto", name).mode == "cached"


def test_cli_refuses_a_cache_with_train_mode_teacher_bn(tiny_teacher_file, tmp_path):
    """End to end: ``--teacher-mode cached --teacher-bn train`` exits 2 with one line before any cache or
    training work (the cache would hold eval-mode BatchNorm targets while the run records train)."""
    from tests.conftest import run_cli, tiny_run_args

    result = run_cli(*tiny_run_args(tiny_teacher_file, tmp_path / "run", "--teacher-mode", "cached",
                                    "--teacher-bn", "train", method="smd"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--teacher-mode cached is not possible for smd" in result.stderr
    assert "eval-mode BatchNorm" in result.stderr
    assert not (tmp_path / "run" / "cache").exists() and not (tmp_path / "run" / "distill").exists()
