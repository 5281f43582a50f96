"""Every registered method ships a published-setting recipe and a CPU recipe, and both validate:
strict recipe schema, the method's own Params, a known student and (for ImageNet recipes) a registry teacher."""

from __future__ import annotations

import pytest

from distillctl.config import load_recipe
from distillctl.methods.base import TeacherDims, get_method, registry
from distillctl.students import resolve_arch
from distillctl.teachers.registry import load_registry
from tests.conftest import REPO

METHODS = sorted(registry())  # every registered method, so a new one cannot ship without its two recipes
# published recipes that set some Params away from their defaults on purpose, each deviation named in the
# recipe's description (e.g. MoCo v2's single loss term while the method defaults to the symmetric loss)
DELIBERATE_DEVIATIONS = {"dlkd": "ImageNet setting", "mocov2": "symmetric: false",
                         "simclr": "temperature: 0.1"}


def _published(method: str) -> list:
    return [p for p in (REPO / "recipes").glob(f"{method}_*.yaml") if not p.stem.endswith("_cpu")]


@pytest.mark.parametrize("method", METHODS)
def test_published_and_cpu_recipes_validate(method: str) -> None:
    published = _published(method)
    assert len(published) == 1, published
    for path in published + [REPO / "recipes" / f"{method}_cpu.yaml"]:
        recipe = load_recipe(str(path))
        assert recipe.method.name == method and recipe.name == path.stem
        cls = get_method(method)
        params = cls.Params(**recipe.method.params)
        resolve_arch(recipe.student.arch)
        if cls.kind == "ssl":
            assert recipe.teacher.source == "none"
        elif recipe.teacher.source == "scratch":  # a teacher co-trained from random init (dogo, oss, simdis online)
            assert recipe.teacher.arch and cls(cls.Params(**recipe.method.params), 8, TeacherDims(8)).requirements(
                32).teacher_mode == "co_trained"
            assert not path.stem.endswith("_cpu") or recipe.data.train == "builtin:digits"
        elif path.stem.endswith("_cpu"):
            assert recipe.teacher.source == "pretrain" and recipe.data.train == "builtin:digits"
            assert all(extra.source == "pretrain" for extra in recipe.teacher.extra)
        else:
            for source in [recipe.teacher.source] + [extra.source for extra in recipe.teacher.extra]:
                load_registry().resolve(source)
            assert recipe.data.image_size == 224
        assert bool(recipe.teacher.extra) == cls.multi_teacher  # multi-teacher recipes list their other teachers
        if path.stem.endswith("_cpu"):
            continue
        if method in DELIBERATE_DEVIATIONS:
            assert DELIBERATE_DEVIATIONS[method].split(":")[0] in recipe.description
        else:  # the published recipe spells out the published defaults
            assert params == cls.Params(**{k: getattr(cls.Params(), k) for k in recipe.method.params})
