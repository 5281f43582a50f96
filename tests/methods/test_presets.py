"""method.preset: the auto derivations are pure functions of (method, dataset size, batch, images seen).

ImageNet-sized inputs give the published values back exactly; small inputs give sized values with a reason;
an explicitly set key is never derived; a tiny run records every derived value in recipe.yaml."""

from __future__ import annotations

import pytest
import yaml

from distillctl.config import build_recipe
from distillctl.methods.base import TeacherDims, build_method, get_method, registry
from distillctl.methods.presets import (RECIPES, RunSize, derive, derive_ema, derive_negatives, derive_per_dataset,
                                       derive_queue, derive_warmup, imagenet_size, method_facts, preset_recipe,
                                       queue_warnings, recipe_summary, scale_lr)
from tests.conftest import run_cli, tiny_run_args

SMALL = RunSize(dataset_images=10_000, batch_size=64, images_seen=468 * 64)  # the benchmark's 30,000-image cell


def _values(name: str, size: RunSize, preset: str = "auto", explicit=frozenset()) -> dict:
    return {d.key: d.value for d in derive(method_facts(get_method(name)), size, preset, explicit)}


def test_every_registered_method_with_a_recipe_is_in_the_table():
    assert set(RECIPES) <= set(registry())
    catalogue_one = {"simreg", "seed", "mocov2", "simclr", "smd", "disco", "bingo", "compress-1q", "compress-2q",
                     "cosine-reg", "mse-reg", "byol", "dino", "seed-smallpatch", "ssl-small", "simreg-multi"}
    assert catalogue_one <= set(RECIPES)


WITH_RECIPE = sorted(name for name, cls in registry().items() if method_facts(cls).recipe is not None)


@pytest.mark.parametrize("name", WITH_RECIPE)
def test_imagenet_sized_run_gives_the_published_values_exactly(name):
    """The run the paper describes (ImageNet for most; CIFAR-10 for the methods published on it)."""
    facts = method_facts(get_method(name))
    size = imagenet_size(facts.recipe)
    auto = derive(facts, size, "auto")
    published = derive(facts, size, "published")
    assert [(d.key, d.value) for d in auto] == [(d.key, d.value) for d in published]
    for item in auto:
        assert item.value == item.published, item
        if item.key.startswith("method.params."):
            assert item.value == facts.defaults[item.key[len("method.params."):]]
    assert {d.key: d.value for d in auto}["train.lr"] == facts.recipe.lr


def test_imagenet_values_spelled_out():
    assert _values("mocov2", imagenet_size(RECIPES["mocov2"])) == {
        "method.params.queue_size": 65536, "method.params.momentum": 0.999, "method.params.negatives": "queue",
        "train.lr": 0.03}
    assert _values("compress-1q", imagenet_size(RECIPES["compress-1q"])) == {
        "method.params.queue_size": 128_000, "train.lr": 0.01}
    assert _values("bingo", imagenet_size(RECIPES["bingo"]))["method.params.bag_warmup_epochs"] == 11
    assert _values("smd", imagenet_size(RECIPES["smd"])) == {"method.params.warmup_epochs": 2, "train.lr": 0.1}


def test_small_run_values():
    # CompRess's 0.01 is for 130 ImageNet epochs: a 30,000-image run starts from the measured short-run lr
    assert _values("compress-1q", SMALL) == {"method.params.queue_size": 8192, "train.lr": 0.05}
    assert _values("compress-2q", SMALL)["train.lr"] == 0.05
    long_run = RunSize(1_281_167, 256, 10 * 1_281_167)  # 10 ImageNet epochs: 7.7 % of the paper's run
    assert _values("compress-1q", long_run)["train.lr"] == 0.01
    # in-batch negatives make it MoCo v3's objective: MoCo v2's lr rule is not applied (the recipe's lr stays)
    # and the head gets MoCo v3's BatchNorm
    assert _values("mocov2", SMALL) == {"method.params.queue_size": 8192, "method.params.momentum": 0.99,
                                        "method.params.negatives": "batch", "method.params.head_bn": True,
                                        "train.lr": None}
    # with the queue kept (queue length set), MoCo's linear rule: 0.03 × 64/256
    assert _values("mocov2", SMALL, explicit={"method.params.queue_size"})["train.lr"] == 0.0075
    # SMD's short-run settings (measured together): lr 0.4 at batch 512 → 0.05 at 64, and its params
    assert _values("smd", SMALL) == {"method.params.center": "batch", "method.params.times": 0.0,
                                     "method.params.temperature": 0.4,
                                     "method.params.warmup_epochs": pytest.approx(1.5),  # half of a 3-epoch run
                                     "train.lr": pytest.approx(0.05)}
    smd_long = _values("smd", RunSize(1_281_167, 64, 2 * 1_281_167))  # 2 ImageNet epochs: 2 % of the paper's run
    assert smd_long == {"method.params.warmup_epochs": pytest.approx(0.04),  # 2 % of a 2-epoch run
                        "train.lr": pytest.approx(0.0125)}  # 0.05 × 64/256
    assert _values("bingo", SMALL)["method.params.bag_warmup_epochs"] == pytest.approx(0.165)  # 11/200 of 3 epochs
    dino = _values("dino", SMALL)
    assert dino["method.params.warmup_teacher_temperature_epochs"] == pytest.approx(0.75)
    assert dino["train.lr"] is None  # a LARS lr is not transferred to an SGD run


def test_queue_bounds():
    # negatives: strictly below the training set; anchors: at most the training set and the images seen
    assert derive_queue(65536, True, RunSize(8192, 64, 100_000))[0] == 4096
    assert derive_queue(65536, False, RunSize(8192, 64, 100_000))[0] == 8192
    assert derive_queue(65536, False, RunSize(100_000, 64, 640))[0] == 512
    value, reason = derive_queue(128_000, False, SMALL)
    assert value == 8192 and "128,000" in reason and "10,000 images" in reason
    assert derive_queue(4096, True, SMALL) == (4096, derive_queue(4096, True, SMALL)[1])  # fits: unchanged


def test_warmup_keeps_its_share_of_the_run():
    value, reason = derive_warmup(10, RECIPES["bingo"], RunSize(10_000, 64, 20 * 156 * 64))  # a 20-epoch run
    assert value == pytest.approx(1.0) and "5% of the run" in reason


def test_cluster_counts_keep_their_images_per_cluster():
    """Noroozi's 2,000 k-means pseudo-classes are sized for ImageNet's 1.28 M images (641 each); on 10,000 images
    auto keeps about 641 each (16 clusters) instead of 5 images per cluster; never below 2; ImageNet: published."""
    paper = method_facts(get_method("noroozi-kt")).paper_images
    assert derive_per_dataset(2000, paper, RunSize(10_000, 64, 30_000))[0] == 16  # 2000 × 10,000 / 1,281,167
    assert derive_per_dataset(2000, paper, RunSize(50_000, 64, 30_000))[0] == 78
    assert derive_per_dataset(2000, paper, RunSize(500, 64, 30_000))[0] == 2  # 0.78 → the floor
    assert derive_per_dataset(2000, paper, RunSize(1_281_167, 256, 10**6))[0] == 2000
    assert _values("noroozi-kt", SMALL)["method.params.clusters"] == 16
    assert _values("noroozi-kt", SMALL, "published")["method.params.clusters"] == 2000
    assert "method.params.clusters" not in _values("noroozi-kt", SMALL, explicit={"method.params.clusters"})
    reason = next(d.reason for d in derive(method_facts(get_method("noroozi-kt")), SMALL) if d.key.endswith("clusters"))
    assert "641 images each" in reason and "→ 16" in reason and "would leave 5 images each" in reason


def test_protocpc_prototypes_keep_their_images_per_prototype():
    """ProtoCPC has no published lr schedule (no recipe) but its 65,536 prototypes are sized for ImageNet (about
    20 images each): auto keeps that on the user's data (512 on 10,000 images), published and ImageNet keep 65,536,
    an explicit out_dim wins, and the lr stays not derived."""
    facts = method_facts(get_method("protocpc"))
    assert facts.recipe is None and facts.per_dataset == ("out_dim",)
    assert _values("protocpc", SMALL)["method.params.out_dim"] == 512  # 65,536 × 10,000 / 1,281,167 = 511.5
    assert _values("protocpc", SMALL, "published")["method.params.out_dim"] == 65_536
    assert _values("protocpc", RunSize(1_281_167, 256, 10**8))["method.params.out_dim"] == 65_536
    assert "method.params.out_dim" not in _values("protocpc", SMALL, explicit={"method.params.out_dim"})
    lr = next(d for d in derive(facts, SMALL) if d.key == "train.lr")
    assert lr.value is None and "no published recipe" in lr.reason
    from distillctl.methods.presets import recipe_summary

    assert recipe_summary(get_method("protocpc")) == {"sized_params": ["out_dim"]}


def test_negatives_leave_a_queue_older_than_a_thousandth_of_the_run():
    """MoCo-type queues: the oldest key is queue / batch steps old; above 0.1 % of the run the negatives are the
    batch's keys (the benchmark's 30,000- and 120,000-image cells: 27 % and 6.8 %); ImageNet's 0.026 % keeps it."""
    assert derive_negatives("queue", 8192, RunSize(10_000, 64, 468 * 64))[0] == "batch"
    assert derive_negatives("queue", 8192, RunSize(10_000, 64, 1875 * 64))[0] == "batch"
    assert derive_negatives("queue", 65536, RunSize(1_281_167, 256, 1_000_800 * 256))[0] == "queue"
    # the boundary: 128 steps old is exactly 0.1 % of a 128,000-step run, one step fewer is too short
    assert derive_negatives("queue", 8192, RunSize(10_000, 64, 128_000 * 64))[0] == "queue"
    assert derive_negatives("queue", 8192, RunSize(10_000, 64, 127_999 * 64))[0] == "batch"
    value, reason = derive_negatives("queue", 8192, RunSize(10_000, 64, 468 * 64))
    assert "up to 128 steps old" in reason and "27.4%" in reason and "0.026%" in reason
    assert derive_negatives("batch", 8192, SMALL)[0] == "batch"  # nothing to shorten
    for name in ("mocov2", "ssl-small", "rekd"):
        assert _values(name, SMALL)["method.params.negatives"] == "batch"
        assert _values(name, SMALL, "published")["method.params.negatives"] == "queue"
        # a queue length the user set keeps the queue; negatives the user set are never derived
        explicit = _values(name, SMALL, explicit={"method.params.queue_size"})
        assert explicit["method.params.negatives"] == "queue"
        assert "method.params.negatives" not in _values(name, SMALL, explicit={"method.params.negatives"})


def test_in_batch_negatives_bring_the_head_batchnorm():
    """head_bn follows a derived in-batch negatives switch (MoCo v3's head); the queue kept, a published preset, or a
    head_bn the user set leave it alone."""
    for name in ("mocov2", "ssl-small", "rekd"):
        derived = {d.key: d for d in derive(method_facts(get_method(name)), SMALL)}
        item = derived["method.params.head_bn"]
        assert (item.value, item.published) == (True, False) and "MoCo v3" in item.reason
        keys = list(derived)  # reported right after the negatives it follows
        assert keys.index("method.params.head_bn") == keys.index("method.params.negatives") + 1
        assert "method.params.head_bn" not in _values(name, SMALL, explicit={"method.params.queue_size"})
        assert "method.params.head_bn" not in _values(name, SMALL, explicit={"method.params.head_bn"})
        assert "method.params.head_bn" not in _values(name, SMALL, "published")
        assert "method.params.head_bn" not in _values(name, imagenet_size(method_facts(get_method(name)).recipe))
    recipe = build_recipe({"method": {"name": "rekd"}, "train": {"batch_size": 64, "epochs": 13}})
    resolved, _ = preset_recipe(recipe, 10_000, 1875 * 64)
    assert resolved.method.params["head_bn"] is True and resolved.derived["method.params.head_bn"]["value"] is True
    assert "head_bn" in recipe_summary(get_method("rekd"))["sized_params"]


def test_ema_time_constant_and_floor():
    assert derive_ema(0.999, RunSize(10_000, 64, 1875 * 64))[0] == pytest.approx(0.99467)  # 1 − 1/187.5
    assert derive_ema(0.999, RunSize(10_000, 64, 100 * 64))[0] == 0.99  # floored (MoCo's ablation)
    assert derive_ema(0.999, RunSize(10_000, 64, 20_000 * 64))[0] == 0.999  # long enough: published


def test_lr_rules():
    assert scale_lr(0.03, 256, 64, "linear") == 0.0075
    assert scale_lr(4.8, 4096, 64, "sqrt") == pytest.approx(0.075 * 64 ** 0.5)  # SimCLR's 0.075·√B
    assert scale_lr(0.01, 256, 64, "none") == 0.01
    simclr = derive(method_facts(get_method("simclr")), RunSize(10_000, 64, 30_000, "lars"))
    assert {d.key: d.value for d in simclr}["train.lr"] == pytest.approx(0.6)
    published = derive(method_facts(get_method("simclr")), RunSize(10_000, 64, 30_000, "lars"), "published")
    assert {d.key: d.value for d in published}["train.lr"] == pytest.approx(0.075)  # the code's 0.3·B/256


def test_short_run_lr_applies_only_within_its_measured_share_of_the_paper_run():
    """A measured short-run lr replaces the paper's under auto while the run sees at most its share of the paper's
    images (scaled by the method's auto rule); longer runs, the paper's own run and the published preset keep the
    paper's lr, and the reason names the evidence."""
    from dataclasses import replace

    from distillctl.methods.presets import ShortRun, derive_lr, uses_short_run_lr

    recipe = replace(RECIPES["seed"], short_run=ShortRun(lr=0.06, max_share=0.01, evidence="rows X and Y"),
                     auto_rule="linear")  # paper: lr 0.03 at batch 256 for 200 epochs of ImageNet
    paper_images = 200 * 1_281_167
    assert recipe.images_seen == paper_images
    short = RunSize(10_000, 64, 120_000)
    value, reason = derive_lr(recipe, short, "auto")
    assert value == 0.015  # 0.06 × 64/256
    assert "rows X and Y" in reason and "short-run lr 0.06" in reason and "0.0468% of the paper's run" in reason
    assert derive_lr(recipe, RunSize(10_000, 64, paper_images // 100), "auto")[0] == 0.015  # at the share: still short
    assert derive_lr(recipe, RunSize(10_000, 64, paper_images // 100 + 64), "auto")[0] == 0.0075  # beyond: the paper's
    assert derive_lr(recipe, short, "published")[0] == 0.03  # published: the paper's lr, its own (no) rule
    assert derive_lr(recipe, imagenet_size(recipe), "auto")[0] == 0.03
    # the one predicate derive_lr and the benchmark's lr notes read
    assert uses_short_run_lr(recipe, short, "auto") and not uses_short_run_lr(recipe, short, "published")
    assert not uses_short_run_lr(recipe, imagenet_size(recipe), "auto")
    assert not uses_short_run_lr(RECIPES["seed"], short, "auto")  # no measured short-run lr


def test_short_run_params_come_with_the_short_run_lr_and_yield_to_explicit_keys():
    """A recipe's short-run params are derived exactly where its short-run lr is (auto, within the measured share),
    replace their own size derivation (SMD's warm-up share), cite the evidence, and never override a key the user
    set; the published preset keeps the paper's values."""
    from distillctl.methods.presets import short_run_reason

    facts = method_facts(get_method("smd"))
    derived = {d.key: d for d in derive(facts, SMALL, "auto")}
    warmup = derived["method.params.warmup_epochs"]
    assert warmup.value == pytest.approx(1.5) and warmup.published == 2.0
    assert "the warm-up covers 50% of this run" in warmup.reason and "≈234 steps" in warmup.reason
    assert facts.recipe.short_run.evidence in warmup.reason
    assert derived["method.params.temperature"].published is None  # the paper's: chosen by student architecture
    assert derived["method.params.temperature"].reason == short_run_reason(facts.recipe, SMALL, "temperature")
    explicit = _values("smd", SMALL, explicit={"method.params.temperature", "method.params.warmup_epochs"})
    assert "method.params.temperature" not in explicit and "method.params.warmup_epochs" not in explicit
    assert explicit["method.params.center"] == "batch"
    assert _values("smd", SMALL, "published") == {"method.params.warmup_epochs": 2, "train.lr": 0.0125}
    from distillctl.methods.presets import recipe_summary

    short = recipe_summary(get_method("smd"))["short_run"]  # what `methods show` prints
    assert short["params"] == {"center": "batch", "temperature": 0.4, "times": 0.0} and short["warmup_share"] == 0.5
    assert short["example_lr"] == pytest.approx(0.05)


def test_published_preset_gives_paper_values_on_a_small_run():
    assert _values("compress-1q", SMALL, "published") == {"method.params.queue_size": 128_000, "train.lr": 0.01}


def test_explicit_keys_are_never_derived():
    values = _values("mocov2", SMALL, explicit={"method.params.queue_size", "train.lr"})
    assert values == {"method.params.momentum": 0.99, "method.params.negatives": "queue"}  # the set queue is kept
    recipe = build_recipe({"method": {"name": "mocov2"}, "train": {"batch_size": 64, "epochs": 3}},
                          ["method.params.queue_size=100", "train.lr=0.2"])
    resolved, derived = preset_recipe(recipe, 10_000, 468 * 64)
    assert resolved.method.params["queue_size"] == 100 and resolved.train.lr == 0.2
    assert {d.key for d in derived} == {"method.params.momentum", "method.params.negatives"}
    assert resolved.derived["method.params.momentum"]["value"] == 0.99
    assert resolved.method.params["negatives"] == "queue"  # the user's 100-row queue is used
    scaled = build_recipe({"method": {"name": "seed"}, "train": {"lr_scaling": "linear"}})
    assert "train.lr" not in {d.key for d in preset_recipe(scaled, 10_000, 30_000)[1]}


def test_preset_recipe_applies_values_that_the_method_accepts():
    recipe = build_recipe({"method": {"name": "bingo"}, "train": {"batch_size": 64, "epochs": 3}})
    resolved, _ = preset_recipe(recipe, 10_000, 468 * 64)
    method = build_method("bingo", resolved.method.params, 8, TeacherDims(12, 6))
    assert method.queue.size == 8192
    assert method.bag_weights(0.1) == (1.0, 0.0) and method.bag_weights(0.2) == (0.5, 0.5)
    assert queue_warnings(method, 10_000, 468 * 64) == []
    published = build_method("bingo", {}, 8, TeacherDims(12, 6))
    assert len(queue_warnings(published, 10_000, 468 * 64)) == 2


@pytest.mark.slow
def test_tiny_run_records_derived_values_in_recipe_yaml(tmp_path, tiny_teacher_file):
    out = tmp_path / "run"
    proc = run_cli(*tiny_run_args(tiny_teacher_file, out, "--set", "train.max_steps=2", "--set", "eval.linear=false",
                                  method="seed"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    derived = recipe["derived"]
    # builtin:digits has 1,797 images; the run plans 2 steps of 64 = 128 images seen
    assert derived["method.params.queue_size"]["value"] == 128 == recipe["method"]["params"]["queue_size"]
    assert derived["method.params.queue_size"]["published"] == 65536
    assert derived["train.lr"]["value"] == 0.03 == recipe["train"]["lr"]
    assert "preset auto: method.params.queue_size = 128" in proc.stdout + proc.stderr
    again = run_cli(*tiny_run_args(tiny_teacher_file, tmp_path / "explicit", "--set", "train.max_steps=2",
                                   "--set", "eval.linear=false", "--set", "method.params.queue_size=96",
                                   "--lr", "0.02", method="seed"))
    assert again.returncode == 0, again.stderr[-3000:]
    explicit = yaml.safe_load((tmp_path / "explicit" / "recipe.yaml").read_text())
    assert explicit["method"]["params"]["queue_size"] == 96 and explicit["train"]["lr"] == 0.02
    assert "method.params.queue_size" not in explicit["derived"] and "train.lr" not in explicit["derived"]


def test_preset_flag_maps_to_method_preset():
    from distillctl.commands import _overrides_from_flags
    from distillctl.errors import UsageError

    assert _overrides_from_flags({"preset": "published"})["method.preset"] == "published"
    assert build_recipe({}, {"method.preset": "published"}).method.preset == "published"
    with pytest.raises(UsageError, match="method.preset"):
        build_recipe({}, {"method.preset": "imagenet"})
