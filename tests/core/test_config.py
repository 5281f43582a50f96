import pytest

from distillctl.config import apply_overrides, build_recipe, load_recipe, parse_set
from distillctl.errors import UsageError


def test_overrides_reach_nested_keys_and_parse_yaml_scalars():
    recipe = build_recipe({}, sets=["train.lr=0.125", "eval.knn_k=[10, 200]", "teacher.accept_license=true",
                                    "method.params.crop_scale=[0.3, 1.0]"])
    assert recipe.train.lr == 0.125
    assert recipe.eval.knn_k == [10, 200]
    assert recipe.teacher.accept_license is True
    assert recipe.method.params == {"crop_scale": [0.3, 1.0]}
    assert recipe.method.typed_params.crop_scale == (0.3, 1.0)  # typed once, from SimReg's Params


@pytest.mark.parametrize("data, key, suggestion", [
    ({"trian": {}}, "trian", "train"),
    ({"train": {"lrr": 0.1}}, "train.lrr", "lr"),
    ({"teacher": {"cache_view": 3}}, "teacher.cache_view", "cache_views"),
])
def test_unknown_key_names_key_and_nearest(data, key, suggestion):
    with pytest.raises(UsageError) as info:
        build_recipe(data)
    assert f"unknown key '{key}'" in info.value.message
    assert suggestion in info.value.hint


@pytest.mark.parametrize("override", ["train.lr=-1", "train.epochs=0", "train.batch_size=1", "data.image_size=100000",
                                      "train.optimizer=adam", "eval.knn_k=[0]"])
def test_bad_values_are_usage_errors(override):
    with pytest.raises(UsageError) as info:
        build_recipe({}, sets=[override])
    assert "invalid value" in info.value.message
    assert info.value.exit_code == 2


def test_set_without_equals_is_rejected():
    with pytest.raises(UsageError):
        build_recipe({}, sets=["train.lr"])


def test_quickstart_recipe_is_valid_and_round_trips(tmp_path):
    recipe = load_recipe("quickstart")
    assert recipe.method.name == "simreg" and recipe.teacher.source == "pretrain"
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(str(path)) == recipe


@pytest.mark.parametrize("value", ["2024", "on", "yes", "null", "1e3", "[x]", "a: b", "#tag", "~"])
def test_typed_overrides_are_not_reparsed_as_yaml(value):
    recipe = build_recipe({}, {"name": value, "out": f"runs/{value}"})
    assert recipe.name == value and recipe.out == f"runs/{value}"


def test_set_text_is_yaml_and_wins_over_typed_overrides():
    assert parse_set(["train.lr=0.5", "eval.knn_k=[1, 2]", "name=on"]) == {"train.lr": 0.5, "eval.knn_k": [1, 2],
                                                                         "name": True}
    recipe = build_recipe({"train": {"lr": 0.1}}, {"train.lr": 0.2}, sets=["train.lr=0.3"])
    assert recipe.train.lr == 0.3


def test_overrides_do_not_mutate_the_base_mapping():
    base = {"train": {"lr": 0.1}}
    recipe = build_recipe(base, {"train.lr": 0.2, "train.epochs": 3})
    assert base == {"train": {"lr": 0.1}} and (recipe.train.lr, recipe.train.epochs) == (0.2, 3)
    assert apply_overrides({}, {"a.b": None}) == {"a": {"b": None}}


def test_method_params_are_typed_when_the_recipe_is_built():
    with pytest.raises(UsageError) as info:
        build_recipe({"method": {"name": "simreg", "params": {"crop_scal": [0.3, 1.0]}}})
    assert "method.params (simreg)" in info.value.message and "crop_scal" in info.value.message
    with pytest.raises(UsageError) as info:
        build_recipe({}, sets=["teacher.pretrain.params.temperature=abc"])
    assert info.value.message.startswith("teacher.pretrain.params.temperature: invalid value 'abc' for method mocov2")
    recipe = build_recipe({}, sets=["teacher.pretrain.params.queue_size=64"])
    assert recipe.teacher.pretrain.typed_params.queue_size == 64


def test_typed_params_follow_a_copy_that_changes_params():
    recipe = build_recipe({}, sets=["method.params.crop_scale=[0.3, 1.0]"])
    copied = recipe.method.model_copy(update={"params": {"crop_scale": [0.5, 1.0]}})  # skips validation
    assert copied.typed_params.crop_scale == (0.5, 1.0) and recipe.method.typed_params.crop_scale == (0.3, 1.0)
