"""Every numeric ``Params`` field of every registered method has a domain (issue 12 §3): out-of-range values
are refused at validation time with exit 2 naming the full key, before any stage runs."""

from __future__ import annotations

import re
import types
import typing

import pytest
from pydantic import ValidationError

from distillctl.errors import UsageError
from distillctl.methods.base import registry
from distillctl.config import typed_method_params
from tests.conftest import run_cli

METHODS = sorted(registry())
NUMERIC = (int, float)


def _leaf_types(annotation) -> list:
    """The scalar types inside an annotation: ``Annotated[int, ...] | None`` → [int, None]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, tuple, list):
        return [leaf for arg in typing.get_args(annotation) if arg is not Ellipsis for leaf in _leaf_types(arg)]
    return [annotation]


def _numeric_fields(params_cls) -> list[tuple[str, object]]:
    """(name, default) of every field holding numbers (alone, optional, or in a tuple/list); bools excluded."""
    out = []
    for name, field in params_cls.model_fields.items():
        leaves = [leaf for leaf in _leaf_types(field.annotation) if leaf is not type(None)]
        if leaves and all(leaf in NUMERIC for leaf in leaves):
            out.append((name, field.default))
    return out


def _has_origin(annotation, wanted) -> bool:
    origin = typing.get_origin(annotation)
    if origin is wanted:
        return True
    return any(_has_origin(arg, wanted) for arg in typing.get_args(annotation) if arg is not Ellipsis)


def _negative_like(params_cls, name: str, default) -> object:
    """A value of the field's shape (number, tuple, list) with a negative number in it."""
    if isinstance(default, tuple):
        return tuple(-1 for _ in default)
    if isinstance(default, list) or _has_origin(params_cls.model_fields[name].annotation, list):
        return [1.0, -1.0]
    return -1


CASES = [(method, name, default) for method in METHODS
         for name, default in _numeric_fields(registry()[method].Params)]


def test_every_method_has_numeric_fields_covered():
    assert len(METHODS) >= 17 and len(CASES) >= 60  # the walk above found the fields (not an empty sweep)
    assert ("seed", "queue_size", 65536) in CASES and ("smd", "temperature", None) in CASES


@pytest.mark.parametrize("method,name,default", CASES, ids=[f"{m}.{n}" for m, n, _ in CASES])
def test_negative_value_is_rejected_naming_the_key(method, name, default):
    params_cls = registry()[method].Params
    params_cls()  # the defaults are inside their domains
    bad = _negative_like(params_cls, name, default)
    try:
        typed_method_params(method, {name: bad}, "method.params")
    except UsageError as exc:
        assert re.match(rf"method\.params\.{name}(\[\d\])?: invalid value", str(exc)), str(exc)
        assert "\n" not in str(exc)
    else:
        pytest.fail(f"{method}: method.params.{name}={bad!r} is accepted; give the field a domain (methods/domains.py)")


@pytest.mark.parametrize("method,name,default", [c for c in CASES if re.search(r"temperature$|queue_size|dim$|_size$|alpha",
                                                                                   c[1])],
                         ids=lambda value: str(value))
def test_zero_is_rejected_where_it_is_meaningless(method, name, default):
    with pytest.raises(ValidationError):
        registry()[method].Params(**{name: 0})


@pytest.mark.parametrize("method,name,default", [c for c in CASES if "momentum" in c[1]], ids=lambda value: str(value))
def test_momentum_above_one_is_rejected(method, name, default):
    with pytest.raises(ValidationError):
        registry()[method].Params(**{name: 1.5})


@pytest.mark.parametrize("method,name,default", [c for c in CASES if c[1].endswith("crop_scale")], ids=lambda value: str(value))
def test_crop_scale_must_be_an_ordered_area_fraction(method, name, default):
    params_cls = registry()[method].Params
    for bad in [(0.5, 1.5), (0.9, 0.2), (0.0, 1.0)]:
        with pytest.raises(ValidationError):
            params_cls(**{name: bad})
    params_cls(**{name: (0.5, 0.5)})


def test_choices_are_checked():
    with pytest.raises(UsageError, match=r"^method\.params\.augmentation: invalid value 'strong'"):
        typed_method_params("mocov2", {"augmentation": "strong"}, "method.params")


@pytest.mark.slow  # one CLI process (~5 s): refused before any stage, nothing written
def test_cli_refuses_out_of_domain_value_before_any_work(tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", "--teacher", "pretrain", "--student", "tiny-cnn", "--method", "seed",
                     "--data", "builtin:digits", "--image-size", "16", "--out", str(out),
                     "--set", "method.params.queue_size=-5")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "method.params.queue_size: invalid value -5 for method seed" in result.stderr
    assert not out.exists() or not any(out.iterdir())
