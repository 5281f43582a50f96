import pytest

from distillctl.config import apply_overrides, build_recipe, load_recipe
from distillctl.errors import UsageError


def test_overrides_reach_nested_keys_and_parse_yaml_scalars():
    recipe = build_recipe({}, ["train.lr=0.125", "eval.knn_k=[10, 200]", "teacher.accept_license=true",
                               "method.params.queue_size=128"])
    assert recipe.train.lr == 0.125
    assert recipe.eval.knn_k == [10, 200]
    assert recipe.teacher.accept_license is True
    assert recipe.method.params == {"queue_size": 128}


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
        build_recipe({}, [override])
    assert "invalid value" in info.value.message
    assert info.value.exit_code == 2


def test_set_without_equals_is_rejected():
    with pytest.raises(UsageError):
        apply_overrides({}, ["train.lr"])


def test_quickstart_recipe_is_valid_and_round_trips(tmp_path):
    recipe = load_recipe("quickstart")
    assert recipe.method.name == "simreg" and recipe.teacher.source == "pretrain"
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(str(path)) == recipe
