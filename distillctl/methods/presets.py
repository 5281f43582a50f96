"""Preset policy (recipe key ``method.preset``): which values of a method's published recipe fit this run.

The published defaults of the catalogue are ImageNet settings: 65,536-row queues, warm-ups counted in epochs
of 1.28 M images, learning rates for batch 256, EMA momenta for a million steps. On a 10,000-image run at
batch 64 they are the wrong size. Two presets:

``published``
    the paper's values exactly: the Params defaults and the paper's learning rate (with the paper's own batch
    rule where the official code applies one, e.g. SMD's ``0.05·B/256``).
``auto`` (default)
    the size-dependent values derived from the dataset size, the batch and the planned images seen:

    * queue length: a queue of contrastive negatives (``Method.queue_negatives``) stays strictly below the
      training-set size (else it holds stale copies of the current image among its negatives); a queue of
      soft-target anchors (SEED, CompRess) is bounded by the training-set size and by the images the run
      enqueues (else rows stay at their random initialisation). Largest power of two under the bound, the
      published length when that fits.
    * warm-ups counted in epochs keep their share of the run: 10 of 200 epochs is 5 % of any run, in steps.
    * learning rate: the paper's lr scaled by the batch with the method's own rule (:data:`RECIPES`). Where the
      benchmark measured the paper's lr too small for runs far shorter than the paper's (:class:`ShortRun`),
      such runs start from the measured lr instead, scaled by the same rule; runs of the paper's length keep its lr.
      Where the measurement found other settings that such runs need with it (SMD: a warm-up of half the run with
      its alignment term alone, a softer temperature, centred targets), they come with that lr and are printed with
      its evidence (:attr:`ShortRun.params`, :attr:`ShortRun.warmup_share`).
    * EMA momentum: the key/target encoder's time constant ``1/(1-m)`` is at most a tenth of the run, never
      below 0.99 (MoCo's ablation: 0.99 trains nearly as well as 0.999, 0.9 fails).
    * k-means cluster and prototype counts sized for the paper's dataset (``PublishedRecipe.per_dataset``, e.g.
      Noroozi's 2,000 pseudo-classes for 1.28 M images; a method's ``per_dataset_counts``, e.g. ProtoCPC's 65,536
      prototypes) keep their images per cluster: ``published × N / N_paper``, at least 2. 2,000 clusters of 10,000
      images are 5 images each, a pseudo-label task the student cannot learn from.
    * MoCo-type negatives (``PublishedRecipe.negatives``: mocov2, ssl-small, rekd): the queue's oldest key is
      ``queue / batch`` steps old; when that is more than 0.1 % of the run (published MoCo v2: 0.026 %), the
      negatives are the batch's other keys instead (MoCo v3). On the benchmark's short runs the stale keys differ
      from the fresh positive by the encoder's drift, and the students collapsed within the first steps. With
      in-batch negatives the projection head also gets MoCo v3's BatchNorm after its hidden layer (``head_bn``),
      where the method has that switch and the user did not set it.

Every function here is pure (numbers in, numbers and a reason out); the pipeline applies the result to the
recipe (:func:`apply`), prints it and writes it into ``recipe.yaml`` (section ``derived``). A key the user set
(recipe file or ``--set``) is never derived. With the ImageNet run the paper describes, ``auto`` gives the
published values back exactly.

Left alone (not size-dependent, or no evidence): temperatures, weight decay, the optimizer, the trainer's lr
warm-up (``train.warmup_epochs``, 0 unless set), DINO's centre momentum (a per-step average of batch means).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

IMAGENET_TRAIN_IMAGES = 1_281_167
EMA_MIN_MOMENTUM = 0.99  # MoCo (He et al. 2020) Table: m=0.99 → 74.4, 0.999 → 75.1, 0.9 → 55.2 (K=4096)
EMA_RUN_FRACTION = 0.1  # time constant 1/(1-m) at most this share of the run's steps
# a queue of negatives whose oldest key is older than this share of the run gives way to in-batch negatives
# (published MoCo v2: 65,536 / 256 = 256 steps of 1,000,800, 0.026 %; collapsed here at 6.8 % and 27 %)
QUEUE_AGE_RUN_FRACTION = 0.001

LrRule = Literal["linear", "sqrt", "none"]
Preset = Literal["auto", "published"]


@dataclass(frozen=True)
class PublishedRecipe:
    """The size-dependent part of a method's published ImageNet recipe.

    ``lr`` is the paper's learning rate at ``batch``; ``published_rule`` is what the official code does with
    another batch, ``auto_rule`` what ``auto`` does (they differ only where the paper recommends another rule
    for small batches, e.g. SimCLR's square-root scaling). ``warmups`` are Params fields counted in epochs of
    the ``epochs``-epoch published run; ``ema`` are EMA momentum fields (per step); ``per_dataset`` are counts
    sized for the paper's ``dataset_images`` (k-means clusters); ``negatives`` choose between a queue of past keys
    and the batch's keys as contrastive negatives (``"queue"`` / ``"batch"``, the queue being ``queue_size``)."""

    source: str
    optimizer: str
    lr: float
    batch: int
    published_rule: LrRule
    auto_rule: LrRule
    epochs: float
    rule_source: str
    warmups: tuple[str, ...] = ()
    ema: tuple[str, ...] = ()
    dataset_images: int = IMAGENET_TRAIN_IMAGES
    per_dataset: tuple[str, ...] = ()  # Params counts sized for the paper's dataset (k-means clusters)
    negatives: tuple[str, ...] = ()  # Params fields choosing queue or in-batch negatives (MoCo v2's ``negatives``)
    short_run: "ShortRun | None" = None  # a measured lr (and params) for runs far shorter than the paper's

    @property
    def images_seen(self) -> int:
        """The images the published run sees: its epochs over its dataset."""
        return int(round(self.epochs * self.dataset_images))


@dataclass(frozen=True)
class ShortRun:
    """Settings measured to fit runs far shorter than the paper's, and where they apply.

    A paper's lr is tuned for its own schedule (CompRess: 0.01 for 130 epochs of ImageNet, 650,000 steps at batch
    256); a run with a few thousand steps at that lr barely leaves its initialisation. ``auto`` uses ``lr`` instead
    (scaled from the paper's batch by the auto rule, like the paper's lr) while the run sees at most ``max_share`` of
    the published run's images: the range the ``evidence`` covers, so runs of the paper's length keep the paper's
    lr. ``params`` are Params values measured together with that lr (field name, value), applied in the same range
    in place of the paper's (and of their own size derivation). ``warmup_share``, where set, is the share of the run
    the recipe's warm-ups cover in that range instead of the paper's share. ``evidence`` names the measurements
    (benchmarks/RESULTS.md rows) and is printed as the reason."""

    lr: float
    max_share: float
    evidence: str
    params: tuple[tuple[str, Any], ...] = ()
    warmup_share: float | None = None  # the recipe's warm-ups cover this share of the run (not the paper's share)


def _sgd(source: str, lr: float, batch: int, epochs: float, rule: LrRule = "none", rule_source: str = "",
         auto_rule: LrRule | None = None, **kwargs: Any) -> PublishedRecipe:
    return PublishedRecipe(source=source, optimizer="sgd", lr=lr, batch=batch, published_rule=rule,
                           auto_rule=auto_rule or rule, epochs=epochs,
                           rule_source=rule_source or "the paper and its code fix the lr at this batch and state no rule",
                           **kwargs)


_SIMREG = _sgd("SimReg (UCDvision/simreg): SGD lr 0.05, batch 256, 130 epochs", 0.05, 256, 130)
_SEED = _sgd("SEED (jacobswan1/SEED): SGD lr 0.03, batch 256, 200 epochs", 0.03, 256, 200)
# CompRess's lr 0.01 is for 130 epochs of ImageNet (650,000 steps, step decay); measured on the benchmark it is too
# small for runs of a few thousand steps. The authors' next distiller, SimReg (same lab, same training code, same
# cached-teacher setting), uses 0.05 at batch 256: the short-run lr, not scaled by batch like the paper's.
_COMPRESS_SHORT_RUN = ShortRun(
    lr=0.05, max_share=0.01,
    evidence=("benchmarks/RESULTS.md, compress-1q on the CIFAR-10 protocol at batch 64, 120,000 images with auto's "
              "8,192-row queue: lr 0.01 → 46.2 % kNN, lr 0.05 → 56.15 %; 1,000,000 images at lr 0.01 → 54.4 %, at lr "
              "0.05 → 73.85 % (and 500,000 at lr 0.05 → 70.7 %); 0.05 is SimReg's lr (the authors' next distiller, "
              "same code)"))
_COMPRESS = _sgd("CompRess (UMBCvision/CompRess): SGD lr 0.01, batch 256, 130 epochs", 0.01, 256, 130,
                 short_run=_COMPRESS_SHORT_RUN)
# SMD on short runs (benchmarks/RESULTS.md, smd rows): the warm-up's cosine term is what aligns the student's new
# head with the teacher. The metric term, whose slope is 1/τ = 25 wherever it saturates, swamps it during the
# warm-up (head cosine 0.002 after 130 steps), and after the warm-up the metric term alone lets an aligned head
# (cosine 0.45–0.57) drift off the teacher (0.03–0.24 within 200–300 steps, at τ 0.4 too): what the student keeps is
# what the warm-up built. So on short runs: the cosine term alone for the first half of the run, then the paper's
# metric term at τ 0.4; the pooled post-ReLU teacher features share one mean direction, onto which the uncentred
# heads collapse, so targets are centred. Measured together at batch 64 (0.05 = 0.4 × 64/512).
_SMD_SHORT_RUN = ShortRun(
    lr=0.4, max_share=0.01,
    evidence=("benchmarks/RESULTS.md, smd on the CIFAR-10 protocol at batch 64, 120,000 images: with these settings "
              "(the smd [auto] row) 42.1 % kNN; with the paper's 2 warm-up epochs instead of half the run (sweep row "
              "auto-warmup_epochs) 31.15 %; the paper's settings with centred targets (sweep row center=batch) 21.35 %, "
              "without (lr 0.0125, warm-up 2 % of the run; CHANGELOG) 16.4 %"),
    params=(("center", "batch"), ("temperature", 0.4), ("times", 0.0)), warmup_share=0.5)
_MOCO_RULE = ("MoCo's README: 'for 4-GPU training, follow the linear lr scaling recipe: --lr 0.015 "
              "--batch-size 128' (the code itself does not scale)")

# Per method: the published recipe's size-dependent values. A method outside this table may declare its own
# as a class attribute ``preset_recipe``; otherwise only its queues are derived.
RECIPES: dict[str, PublishedRecipe] = {
    "simreg": _SIMREG,
    "simreg-multi": _SIMREG,
    "cosine-reg": _sgd("baseline without a paper: SimReg's recipe (SGD lr 0.05, batch 256, 130 epochs)", 0.05, 256, 130),
    "mse-reg": _sgd("baseline without a paper: SimReg's recipe (SGD lr 0.05, batch 256, 130 epochs)", 0.05, 256, 130),
    "seed": _SEED,
    "seed-smallpatch": _sgd("SEED main_small-patch.py: SGD lr 0.03, batch 256, 800 epochs", 0.03, 256, 800),
    "compress-1q": _COMPRESS,
    "compress-2q": _sgd(_COMPRESS.source, 0.01, 256, 130, ema=("momentum",), short_run=_COMPRESS_SHORT_RUN),
    "smd": _sgd("SMD (liuhao-lh/SMD): SGD lr 0.05·B/256, batch 512, 100 epochs, 2 warm-up epochs", 0.1, 512, 100,
                rule="linear", rule_source="SMD's code sets lr = 0.05 × batch / 256", warmups=("warmup_epochs",),
                short_run=_SMD_SHORT_RUN),
    "disco": _sgd("DisCo (Yuting-Gao/DisCo-pytorch): SGD lr 0.03, batch 256, 200 epochs", 0.03, 256, 200,
                  ema=("momentum",)),
    "bingo": _sgd("BINGO (haohang96/bingo): SGD lr 0.03, batch 256, 200 epochs; bag weights switch after 11 epochs",
                  0.03, 256, 200, warmups=("bag_warmup_epochs",)),
    "mocov2": _sgd("MoCo v2 (facebookresearch/moco): SGD lr 0.03, batch 256, 200 epochs", 0.03, 256, 200,
                   rule="none", auto_rule="linear", rule_source=_MOCO_RULE, ema=("momentum",),
                   negatives=("negatives",)),
    "ssl-small": _sgd("ssl-small (WOWNICE/ssl-small, MoCo v2 code): SGD lr 0.06, batch 512, 800 epochs", 0.06, 512, 800,
                      rule="none", auto_rule="linear", rule_source=_MOCO_RULE, ema=("momentum",),
                      negatives=("negatives",)),
    "simclr": PublishedRecipe(
        source="SimCLR (google-research/simclr): LARS lr 0.3·B/256 (4.8 at batch 4096), 1000 epochs", optimizer="lars",
        lr=4.8, batch=4096, published_rule="linear", auto_rule="sqrt", epochs=1000,
        rule_source="SimCLR appendix B.1: lr = 0.075·√B works better than 0.3·B/256 at small batches"),
    "byol": PublishedRecipe(
        source="BYOL (deepmind-research/byol): LARS lr 0.2·B/256, batch 4096, 1000 epochs", optimizer="lars", lr=3.2,
        batch=4096, published_rule="linear", auto_rule="linear", epochs=1000,
        rule_source="BYOL's code sets lr = 0.2 × batch / 256", ema=("momentum",)),
    "dino": PublishedRecipe(
        source="SSLight (saic-fi/SSLight, DINO code): LARS base lr 0.48 per 256 images, 200 epochs", optimizer="lars",
        lr=0.48, batch=256, published_rule="linear", auto_rule="linear", epochs=200,
        rule_source="SSLight trainer.py: lr = BASE_LR × global batch / 256 (TRAIN.BATCH_SIZE 128 is per GPU; "
                    "the paper's batch is 1024 on 8 GPUs, with SyncBatchNorm)",
        warmups=("warmup_teacher_temperature_epochs", "freeze_last_layer_epochs"), ema=("momentum",)),
}


@dataclass(frozen=True)
class Derived:
    """One value the preset chose: its recipe key, the value, the published value and why."""

    key: str  # e.g. "method.params.queue_size", "train.lr"
    value: Any
    published: Any
    reason: str

    def as_record(self) -> dict[str, Any]:
        return {"value": self.value, "published": self.published, "reason": self.reason}


@dataclass(frozen=True)
class RunSize:
    """What the derivations look at: training-set size, global batch and planned images seen."""

    dataset_images: int
    batch_size: int
    images_seen: int
    optimizer: str = "sgd"

    @property
    def steps(self) -> int:
        return max(1, self.images_seen // max(1, self.batch_size))

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.dataset_images // max(1, self.batch_size))

    @property
    def epochs(self) -> float:
        """The run's length in the epochs methods count (step / steps-per-epoch)."""
        return self.steps / self.steps_per_epoch


def imagenet_size(recipe: PublishedRecipe) -> RunSize:
    """The run the paper describes: its dataset, its batch, its number of epochs."""
    steps_per_epoch = recipe.dataset_images // recipe.batch
    return RunSize(recipe.dataset_images, recipe.batch, int(round(recipe.epochs * steps_per_epoch)) * recipe.batch,
                   recipe.optimizer)


# --- the derivations --------------------------------------------------------------------------------------

def _power_of_two_at_most(bound: int) -> int:
    return 1 << max(0, int(bound).bit_length() - 1) if bound >= 1 else 1


def derive_queue(published: int, negatives: bool, size: RunSize) -> tuple[int, str]:
    """Queue length for this run and the reason (see the module docstring)."""
    if negatives:
        bound = min(size.dataset_images - 1, size.images_seen)
        why = (f"a queue of contrastive negatives must stay below the training set ({size.dataset_images:,} images) "
               f"and fill within the run ({size.images_seen:,} images seen)")
    else:
        bound = min(size.dataset_images, size.images_seen)
        why = (f"a queue of anchors is bounded by the training set ({size.dataset_images:,} images) and the images "
               f"the run enqueues ({size.images_seen:,})")
    if published <= bound:
        return published, f"published {published:,} fits: {why}"
    value = _power_of_two_at_most(bound)
    return value, f"published {published:,} is too long: {why}; largest power of two within that: {value:,}"


def _round(value: float, digits: int = 6) -> float:
    """Round to ``digits`` significant digits (an exact integer stays one)."""
    if value == 0 or float(value).is_integer():
        return float(value)
    return round(value, max(0, digits - 1 - int(math.floor(math.log10(abs(value))))))


def derive_warmup(published: float, recipe: PublishedRecipe, size: RunSize) -> tuple[float, str]:
    """A warm-up of ``published`` epochs of the published run keeps its share of this run (in steps)."""
    share = published / recipe.epochs
    value = _round(share * size.epochs)
    steps = int(round(value * size.steps_per_epoch))
    return value, (f"published {published:g} of {recipe.epochs:g} epochs = {100 * share:.3g}% of the run; this run is "
                   f"{size.epochs:.4g} epochs ({size.steps:,} steps of {size.batch_size}) → {value:g} epochs "
                   f"(≈{steps:,} steps)")


def scale_lr(lr: float, from_batch: int, to_batch: int, rule: LrRule) -> float:
    factor = {"linear": to_batch / from_batch, "sqrt": math.sqrt(to_batch / from_batch), "none": 1.0}[rule]
    return _round(lr * factor)


def uses_short_run_lr(recipe: PublishedRecipe, size: RunSize, preset: Preset) -> bool:
    """Whether ``preset`` starts this run from the recipe's measured short-run lr rather than the paper's: ``auto``,
    a recipe with one, and a run that sees at most its ``max_share`` of the published run's images."""
    short = recipe.short_run
    return (preset == "auto" and short is not None
            and size.images_seen / max(1, recipe.images_seen) <= short.max_share)


def _short_run_share(recipe: PublishedRecipe, size: RunSize) -> str:
    short = recipe.short_run
    return (f"this run sees {size.images_seen:,} images, {100 * size.images_seen / max(1, recipe.images_seen):.3g}% "
            f"of the paper's run ({recipe.images_seen:,}; at most {100 * short.max_share:g}% uses the short-run "
            "settings)")


def short_run_reason(recipe: PublishedRecipe, size: RunSize, name: str) -> str:
    """Why ``auto`` sets the short-run value of Params field ``name`` on this run (see :class:`ShortRun`)."""
    short = recipe.short_run
    if name in recipe.warmups and name not in dict(short.params) and short.warmup_share is not None:
        steps = int(round(short.warmup_share * size.steps))
        published = (f"in place of the paper's share of the run, the warm-up covers {100 * short.warmup_share:g}% "
                     f"of this run ({size.epochs:.4g} epochs, {size.steps:,} steps of {size.batch_size} → ≈{steps:,} "
                     "steps)")
    else:
        published = "in place of the paper's value"
    return (f"{_short_run_share(recipe, size)}; {published}, measured together with the short-run lr "
            f"({short.lr:g} at batch {recipe.batch}): {short.evidence}")


def derive_lr(recipe: PublishedRecipe, size: RunSize, preset: Preset) -> tuple[float | None, str]:
    """The learning rate for this run's batch, or None (keep the recipe's) when ``auto`` cannot transfer it."""
    rule = recipe.published_rule if preset == "published" else recipe.auto_rule
    if preset == "auto" and size.optimizer != recipe.optimizer:
        return None, (f"not derived: the paper's lr {recipe.lr:g} (batch {recipe.batch}) is a {recipe.optimizer} lr and "
                      f"this run uses {size.optimizer}; set train.optimizer={recipe.optimizer} to get it scaled, or "
                      "train.lr")
    base, which = recipe.lr, "the paper's lr"
    prefix = ""
    if uses_short_run_lr(recipe, size, preset):
        short = recipe.short_run
        base, which = short.lr, "the short-run lr"
        prefix = (f"{_short_run_share(recipe, size)}, and the paper's lr {recipe.lr:g} is measured too small "
                  f"for that: {short.evidence}; ")
    value = scale_lr(base, recipe.batch, size.batch_size, rule)
    note = "" if size.optimizer == recipe.optimizer else f"; the paper uses {recipe.optimizer}, this run {size.optimizer}"
    if rule == "none":
        return value, (f"{prefix}{which} {base:g} at batch {recipe.batch}, not scaled to batch {size.batch_size} "
                       f"({recipe.rule_source}){note}")
    formula = {"linear": f"{base:g} × {size.batch_size}/{recipe.batch}",
               "sqrt": f"{base:g} × √({size.batch_size}/{recipe.batch})"}[rule]
    rule_text = {"linear": "linear", "sqrt": "square-root"}[rule]
    return value, (f"{prefix}{rule_text} batch scaling of {which} {base:g} at batch {recipe.batch} "
                   f"({recipe.rule_source}): {formula} = {value:g}{note}")


def derive_ema(published: float, size: RunSize) -> tuple[float, str]:
    """EMA momentum whose time constant 1/(1-m) is at most a tenth of the run, floored at 0.99."""
    ceiling = 1.0 - 1.0 / (EMA_RUN_FRACTION * size.steps)
    if published <= ceiling:
        return published, (f"published {published:g} fits: its time constant ({1 / (1 - published):,.0f} steps) is "
                           f"within a tenth of the run ({size.steps:,} steps)")
    value = _round(max(EMA_MIN_MOMENTUM, ceiling), 5)
    return value, (f"published {published:g} averages over {1 / (1 - published):,.0f} steps, more than a tenth of "
                   f"this run ({size.steps:,} steps), so the EMA copy would lag its online network for most of "
                   f"training; 1 − 1/({EMA_RUN_FRACTION:g} × steps) = {ceiling:.5f}, floored at {EMA_MIN_MOMENTUM} "
                   f"(MoCo's ablation) → {value:g}")


def derive_negatives(published: str, queue: int, size: RunSize) -> tuple[str, str]:
    """Queue or in-batch negatives: the queue's oldest key is ``queue / batch`` steps old; when that is more than
    :data:`QUEUE_AGE_RUN_FRACTION` of the run, the encoder drifts across the queue and the stale keys differ from
    the fresh positive by that drift, a shortcut the student takes instead of telling images apart (measured on
    the benchmark: the embeddings collapse within the first steps). The batch's own keys have no such age."""
    age = queue / max(1, size.batch_size)
    share = 100 * age / size.steps
    if published != "queue":
        return published, f"published {published}: no queue"
    if age <= QUEUE_AGE_RUN_FRACTION * size.steps:
        return published, (f"published queue fits: its oldest key is at most {age:,.0f} steps old, {share:.3g}% of this run "
                           f"({size.steps:,} steps; at most {100 * QUEUE_AGE_RUN_FRACTION:g}%)")
    return "batch", (f"a queue of {queue:,} keys at batch {size.batch_size} keeps keys up to {age:,.0f} steps old, "
                     f"{share:.3g}% of this run ({size.steps:,} steps; published MoCo v2: 0.026%, at most "
                     f"{100 * QUEUE_AGE_RUN_FRACTION:g}%); keys that old differ from the fresh positive by the "
                     "encoder's drift, a shortcut that collapsed the benchmark's students, so the negatives are the "
                     "batch's other keys (MoCo v3)")


# why ``auto`` turns on the head's BatchNorm with in-batch negatives (benchmarks/RESULTS.md, rekd rows)
HEAD_BN_REASON = ("with in-batch negatives (derived above) the objective is MoCo v3's, whose projection head has "
                  "BatchNorm after its hidden layer; measured on the benchmark at 120,000 images, rekd with in-batch "
                  "negatives: 34.0 % kNN without it, 36.2 % with it")



def head_bn_follows_negatives(facts: "MethodFacts") -> bool:
    """Whether ``auto`` derives ``head_bn`` with in-batch negatives: the method has both switches."""
    return bool(facts.recipe and facts.recipe.negatives) and "head_bn" in facts.defaults


MIN_CLUSTERS = 2


def derive_per_dataset(published: int, paper_images: int, size: RunSize) -> tuple[int, str]:
    """A count sized for the paper's dataset of ``paper_images`` (k-means clusters, prototypes) keeps its images per
    cluster on this dataset."""
    per = paper_images / published
    value = max(MIN_CLUSTERS, int(round(published * size.dataset_images / paper_images)))
    if value == published:
        return published, (f"published {published:,} fits: {paper_images:,} / {published:,} = {per:,.0f} "
                           f"images each, and this training set has {size.dataset_images:,} images")
    return value, (f"published {published:,} for {paper_images:,} images ({per:,.0f} images each); this "
                   f"training set has {size.dataset_images:,} images: {published:,} × {size.dataset_images:,} / "
                   f"{paper_images:,} → {value:,} (at least {MIN_CLUSTERS}; the published count would leave "
                   f"{size.dataset_images / published:.3g} images each)")


# --- one method -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodFacts:
    """What the derivations need to know about a method, without importing it."""

    name: str
    defaults: dict[str, Any]  # Params defaults (the published values)
    queue_negatives: bool = False
    recipe: PublishedRecipe | None = None
    queue_fields: tuple[str, ...] = field(default=())
    # Params counts sized for the paper's dataset of paper_images: the recipe's per_dataset, and a method's own
    # ``per_dataset_counts`` (class attribute) where it has no published lr schedule to put in a recipe
    per_dataset: tuple[str, ...] = ()
    paper_images: int = IMAGENET_TRAIN_IMAGES


def method_facts(method_cls) -> MethodFacts:
    """The facts of a registered method class (Params defaults, queue kind, published recipe)."""
    defaults = method_cls.Params().model_dump()
    recipe = getattr(method_cls, "preset_recipe", None) or RECIPES.get(method_cls.name)
    queues = tuple(name for name in defaults if name == "queue_size" or name.endswith("_queue_size"))
    per_dataset = (recipe.per_dataset if recipe else ()) + tuple(getattr(method_cls, "per_dataset_counts", ()))
    return MethodFacts(method_cls.name, defaults, bool(getattr(method_cls, "queue_negatives", False)), recipe, queues,
                       per_dataset, recipe.dataset_images if recipe else IMAGENET_TRAIN_IMAGES)


def derive(facts: MethodFacts, size: RunSize, preset: Preset = "auto",
           explicit: frozenset[str] | set[str] = frozenset()) -> list[Derived]:
    """Every derived value for one method and run. ``explicit`` holds recipe keys the user set (never derived).

    ``published`` returns the paper's values (with reasons); ``auto`` the values sized for this run."""
    out: list[Derived] = []

    def add(key: str, value: Any, published: Any, reason: str) -> None:
        if key not in explicit:
            out.append(Derived(key, value, published, reason))

    recipe = facts.recipe

    def negatives_auto(published: Any) -> tuple[str, str]:
        if "method.params.queue_size" in explicit:
            return str(published), f"published {published}: method.params.queue_size was set, so the queue is kept"
        queue = derive_queue(int(facts.defaults["queue_size"]), facts.queue_negatives, size)[0]
        return derive_negatives(str(published), queue, size)
    # (Params fields, their auto derivation, the published preset's reason), in the order they are reported
    sized: list[tuple[tuple[str, ...], Callable[[Any], tuple[Any, str]], Callable[[Any], str]]] = [
        (facts.queue_fields, lambda p: derive_queue(int(p), facts.queue_negatives, size),
         lambda p: "published preset: the paper's queue length"),
        (facts.per_dataset, lambda p: derive_per_dataset(int(p), facts.paper_images, size),
         lambda p: f"published preset: the paper's count for {facts.paper_images:,} images")]
    if recipe is not None:
        sized += [
            (recipe.warmups, lambda p: derive_warmup(float(p), recipe, size),
             lambda p: f"published preset: {p:g} of the paper's {recipe.epochs:g} epochs"),
            (recipe.ema, lambda p: derive_ema(float(p), size), lambda p: "published preset: the paper's EMA momentum"),
            (recipe.negatives, negatives_auto,
             lambda p: "published preset: the paper's negatives")]
    short_params: dict[str, Any] = {}
    if recipe is not None and recipe.short_run is not None and uses_short_run_lr(recipe, size, preset):
        short_params = dict(recipe.short_run.params)
        for name, value in short_params.items():
            add(f"method.params.{name}", value, facts.defaults[name], short_run_reason(recipe, size, name))
        if recipe.short_run.warmup_share is not None:
            for name in recipe.warmups:
                if name not in short_params:
                    value = _round(recipe.short_run.warmup_share * size.epochs)
                    add(f"method.params.{name}", value, facts.defaults[name], short_run_reason(recipe, size, name))
                    short_params[name] = value
    for names, derive_auto, published_reason in sized:
        for name in names:
            if name in short_params:
                continue
            published = facts.defaults[name]
            if preset == "published":
                add(f"method.params.{name}", published, published, published_reason(published))
            else:
                add(f"method.params.{name}", *_with_published(derive_auto(published), published))
    negatives_keys = {f"method.params.{name}" for name in recipe.negatives} if recipe is not None else set()
    in_batch = any(d.key in negatives_keys and d.value == "batch" and d.published == "queue" for d in out)
    if in_batch and head_bn_follows_negatives(facts):
        add("method.params.head_bn", True, facts.defaults["head_bn"], HEAD_BN_REASON)
    if recipe is not None:
        value, reason = derive_lr(recipe, size, preset)
        published_lr = recipe.lr
        if in_batch:
            # the objective is now MoCo v3's (in-batch negatives), whose published lr is a LARS lr: not MoCo v2's rule
            value, reason = None, ("not derived: with in-batch negatives (derived above) the objective is MoCo v3's, "
                                   f"whose published lr is a LARS lr, and the paper's {published_lr:g} is MoCo v2's "
                                   "lr for its queue (at MoCo v2's linear rule, 0.0075 at batch 64, rekd with "
                                   "in-batch negatives did not learn in the benchmark's 30,000-image run)")
        if value is not None:
            add("train.lr", value, published_lr, reason)
        elif "train.lr" not in explicit:
            out.append(Derived("train.lr", None, published_lr, reason))
    elif "train.lr" not in explicit:
        out.append(Derived("train.lr", None, None, f"not derived: {facts.name} has no published recipe in "
                                                   "distillctl.methods.presets.RECIPES"))
    return out


def _with_published(pair: tuple[Any, str], published: Any) -> tuple[Any, Any, str]:
    value, reason = pair
    return value, published, reason


# --- recipes --------------------------------------------------------------------------------------------

def explicit_keys(recipe) -> set[str]:
    """Recipe keys the user set (recipe file, flag or ``--set``): ``method.params.*`` given, and train fields in
    pydantic's ``model_fields_set``. ``train.lr_scaling=linear`` counts as setting the lr (its own rule)."""
    keys = {f"method.params.{name}" for name in recipe.method.params}
    keys |= {f"train.{name}" for name in recipe.train.model_fields_set}
    if recipe.train.lr_scaling != "none":
        keys.add("train.lr")
    return keys


def apply(recipe, derived: list[Derived]):
    """A copy of ``recipe`` with the derived values set and recorded under ``derived`` (key → value, published,
    reason). Entries whose value is None (not derived) are recorded but change nothing."""
    params = dict(recipe.method.params)
    train_updates: dict[str, Any] = {}
    for item in derived:
        if item.value is None:
            continue
        section, _, name = item.key.partition(".")
        if section == "method" and name.startswith("params."):
            params[name[len("params."):]] = item.value
        elif section == "train":
            train_updates[name] = item.value
    method = recipe.method.model_copy(update={"params": params})
    train = recipe.train.model_copy(update=train_updates) if train_updates else recipe.train
    records = {**recipe.derived, **{item.key: item.as_record() for item in derived}}
    return recipe.model_copy(update={"method": method, "train": train, "derived": records})


def describe(derived: list[Derived], preset: str) -> list[str]:
    """One printable line per derived value."""
    lines = []
    for item in derived:
        shown = "unchanged" if item.value is None else f"{item.value!r}"
        lines.append(f"preset {preset}: {item.key} = {shown} ({item.reason})")
    return lines


# --- queue warnings (a queue left at an ImageNet length on a small run) ---------------------------------

def queue_warnings(method, train_images: int, images_seen: int) -> list[str]:
    """Plain-language warnings for feature queues sized for ImageNet on a much smaller run.

    A run that enqueues fewer rows than the queue holds trains against random initial rows for its whole length.
    Where the rows are contrastive negatives (``Method.queue_negatives``: MoCo v2, DisCo, BINGO), a queue longer
    than the training set also holds stale copies of the current image among them; soft-target anchor queues
    (SEED, CompRess) are not hurt by that. Neither is an error (``method.preset=published`` asks for the paper's
    lengths), so these are warnings; the ``auto`` preset sizes queues so that neither applies.
    """
    from distillctl.methods.common import FeatureQueue

    size = max((module.size for module in method.modules() if isinstance(module, FeatureQueue)), default=None)
    if size is None:
        return []
    out = []
    if images_seen < size:
        out.append(f"the {size:,}-row queue of {method.name} never fills: the run enqueues about {images_seen:,} rows, "
                   f"so about {size - images_seen:,} rows stay at their random initialisation; "
                   "set method.params.queue_size at or below the images seen (or method.preset=auto)")
    if size > train_images and method.queue_negatives:
        out.append(f"the {size:,}-row queue of {method.name} is longer than the training set ({train_images:,} images): "
                   "it holds several embeddings of each image at once (stale copies of the current image among its negatives); "
                   f"the published length assumes ImageNet, consider method.params.queue_size <= {train_images:,}")
    return out


def preset_recipe(recipe, dataset_images: int, images_seen: int):
    """``(recipe with the preset's values applied and recorded, the derived values)`` for one run."""
    from distillctl.methods.base import get_method

    facts = method_facts(get_method(recipe.method.name))
    size = RunSize(dataset_images, recipe.train.batch_size, images_seen, recipe.train.optimizer)
    derived = derive(facts, size, recipe.method.preset, explicit_keys(recipe))
    return apply(recipe, derived), derived


def recipe_summary(method_cls, example_batch: int = 64) -> dict[str, Any] | None:
    """What ``methods show`` prints about the preset: the paper's lr and batch rule, the auto rule (with the lr it
    gives at ``example_batch``), and which params the auto preset sizes."""
    facts = method_facts(method_cls)
    recipe = facts.recipe
    if recipe is None:
        sized = facts.queue_fields + facts.per_dataset
        return {"sized_params": list(sized)} if sized else None
    return {"source": recipe.source, "optimizer": recipe.optimizer, "lr": recipe.lr, "batch": recipe.batch,
            "published_rule": recipe.published_rule, "auto_rule": recipe.auto_rule, "rule_source": recipe.rule_source,
            "auto_lr_example": {"batch": example_batch,
                                "lr": scale_lr(recipe.lr, recipe.batch, example_batch, recipe.auto_rule)},
            "short_run": None if recipe.short_run is None else {
                "lr": recipe.short_run.lr, "max_share": recipe.short_run.max_share,
                "max_images": int(recipe.short_run.max_share * recipe.images_seen), "evidence": recipe.short_run.evidence,
                "params": dict(recipe.short_run.params), "warmup_share": recipe.short_run.warmup_share,
                "example_lr": scale_lr(recipe.short_run.lr, recipe.batch, example_batch, recipe.auto_rule)},
            "sized_params": list(dict.fromkeys(
                facts.queue_fields + recipe.warmups + recipe.ema + facts.per_dataset + recipe.negatives
                + (("head_bn",) if head_bn_follows_negatives(facts) else ())
                + tuple(name for name, _ in (recipe.short_run.params if recipe.short_run else ()))))}
