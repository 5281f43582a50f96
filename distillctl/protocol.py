"""Benchmark protocols: a grid of ``pretrain`` runs (SSL methods × student architectures) under one budget,
each student evaluated on a labelled split, with each architecture's random-init floor, in one results table.

A protocol is plain data (``recipes/protocols/<name>.yaml``, ``yaml.safe_load``, a strict schema): the grid, the
shared data/budget/optimiser settings, per-method head sizes, the evaluation, and the assumptions it makes where
the paper gives no value. ``lightweight-ssl`` is arXiv 2110.11160's comparison (methods.md §19).

Layout of ``--out DIR``::

    protocol.json                     the resolved protocol and inputs of the last invocation
    runs/<method>__<arch>/            one ordinary ``pretrain`` run directory per cell (summary.json, student/, …)
    runs/<method>__<arch>/protocol_cell.json   the cell's finished marker (fingerprint of everything it depends on)
    floors/<arch>.json                the random-init student of that architecture, evaluated the same way
    results.json, results.md          the table, read from the cells' summary.json and the floor files

Cells run **in this process**, one after another, through :func:`distillctl.pipeline.run_pipeline`: every cell
is exactly a ``pretrain`` run (same stages, checkpoints, fingerprints, errors and exit codes), without paying
a fresh interpreter + torch import per cell, and a failure stops the protocol with that cell's error. Resuming
is the pipeline's: a cell whose marker matches is skipped; any other cell is (re)run, and an interrupted one
continues from its last checkpoint (``train.resume: auto``). The labelled evaluation of a cell is written into
its ``summary.json`` under ``protocol`` (a pretrain run on unlabelled data has no labelled split of its own).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from distillctl._infra import atomic_write_json, get_logger, phase
from distillctl.errors import InputError, UsageError, unknown_name

log = get_logger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MARKER = "protocol_cell.json"
BUDGET_KEYS = ("epochs", "max_steps", "warmup_epochs", "device")  # train.* keys a cell's budget decides


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Grid(_Strict):
    methods: list[str] = Field(min_length=1)
    archs: list[str] = Field(min_length=1)


class ProtocolData(_Strict):
    image_size: int = Field(ge=8, le=1024)
    crop_pct: float = Field(1.0, gt=0, le=1.0)
    mean: tuple[float, float, float] | None = None  # None: ImageNet's
    std: tuple[float, float, float] | None = None


class Budget(_Strict):
    images: int = Field(ge=1)  # training images seen per cell (steps = ceil(images / batch_size))
    # linear warm-up as a share of the steps, so a --budget-images override keeps the schedule's shape
    warmup_fraction: float = Field(0.0, ge=0, lt=1)


class ProtocolEval(_Strict):
    knn_k: list[int] = Field(default_factory=lambda: [20], min_length=1)
    knn_temperature: float = Field(0.07, gt=0)
    linear_epochs: int = Field(50, ge=1)
    linear_lrs: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0], min_length=1)
    linear_weight_decays: list[float] = Field(default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2], min_length=1)
    batch_size: int = Field(256, ge=1)


class ProtocolSpec(_Strict):
    """One ``recipes/protocols/<name>.yaml``."""

    name: str
    title: str
    description: str
    source: str
    assumptions: list[str] = Field(default_factory=list)
    grid: Grid
    data: ProtocolData
    budget: Budget
    train: dict[str, Any] = Field(default_factory=dict)  # recipe train.* keys shared by every cell
    method_params: dict[str, dict[str, Any]] = Field(default_factory=dict)  # method → method.params
    eval: ProtocolEval = Field(default_factory=ProtocolEval)

    @field_validator("train")
    @classmethod
    def _budget_keys_are_the_budgets(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(set(value) & set(BUDGET_KEYS))
        if owned:
            raise ValueError(f"{', '.join(owned)} follow from budget (images, warmup_fraction) and --device; "
                             "remove them from train")
        return value


@dataclass(frozen=True)
class ProtocolInputs:
    """What the user points the protocol at, and the grid/budget overrides of this invocation."""

    data: str
    eval_train: str
    eval_val: str
    out: Path
    budget_images: int | None = None
    methods: tuple[str, ...] | None = None
    archs: tuple[str, ...] | None = None
    image_size: int | None = None
    device: str = "auto"


@dataclass(frozen=True)
class Cell:
    method: str
    arch: str  # canonical (timm name or tv:<name>)

    @property
    def key(self) -> str:
        return f"{self.method}__{slug(self.arch)}"


def slug(arch: str) -> str:
    """A directory name for an architecture (``tv:squeezenet1_1`` → ``tv-squeezenet1_1``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", arch)


# --- finding and reading protocols ---------------------------------------------------------------

def protocol_dirs() -> list[Path]:
    from distillctl.config import recipe_search_dirs

    return [directory / "protocols" for directory in recipe_search_dirs()]


def list_protocols() -> list[Path]:
    from distillctl.config import yaml_files

    return yaml_files(protocol_dirs())


def find_protocol(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if not path.is_file():
            raise InputError(f"protocol file not found: {name_or_path}")
        return path
    for candidate in list_protocols():
        if candidate.stem == name_or_path:
            return candidate
    raise unknown_name("protocol", name_or_path, [p.stem for p in list_protocols()])


def load_protocol(name_or_path: str) -> ProtocolSpec:
    """The protocol, validated (unknown keys, bad values, unknown methods/archs and train keys: exit 2)."""
    from distillctl.config import format_validation_error, read_yaml

    path = find_protocol(name_or_path)
    try:
        spec = ProtocolSpec(**read_yaml(path))
    except ValidationError as exc:
        raise format_validation_error(exc, ProtocolSpec, prefix=f"protocol {path.name}") from exc
    _check_grid(spec.grid.methods, spec.grid.archs)
    _cell_recipe(spec, Cell(spec.grid.methods[0], spec.grid.archs[0]), "builtin:digits", Path("."), 1, "auto")
    return spec


def _check_grid(methods: list[str] | tuple[str, ...], archs: list[str] | tuple[str, ...]) -> list[str]:
    """Every method is an SSL method and every arch a student; returns the canonical arch names."""
    from distillctl.methods.base import get_method
    from distillctl.students import resolve_arch

    for method in methods:
        if get_method(method).kind != "ssl":
            raise UsageError(f"{method} is a distillation method; a protocol pre-trains with SSL methods",
                             hint="distillctl methods list shows the kind of each method")
    return [resolve_arch(arch) for arch in archs]


# --- planning ------------------------------------------------------------------------------------

def budget_schedule(images: int, batch_size: int, dataset_size: int, warmup_fraction: float = 0.0) -> dict[str, Any]:
    """``train.epochs``/``max_steps``/``warmup_epochs`` that stop after ``ceil(images / batch)`` steps: the epochs
    cover the steps (the cosine schedule spans them), ``max_steps`` stops inside the last epoch when it is not
    whole, and the warm-up lasts ``warmup_fraction`` of the steps (the trainer rounds it to whole steps)."""
    steps = math.ceil(images / batch_size)
    steps_per_epoch = max(1, dataset_size // batch_size)
    epochs = math.ceil(steps / steps_per_epoch)
    return {"epochs": epochs, "max_steps": steps if steps < epochs * steps_per_epoch else None,
            "warmup_epochs": round(warmup_fraction * steps / steps_per_epoch, 6)}


def _cell_recipe(spec: ProtocolSpec, cell: Cell, data: str, run_dir: Path, dataset_size: int, device: str,
                 budget_images: int | None = None, image_size: int | None = None):
    """The cell's ``pretrain`` recipe: the protocol's shared settings plus the cell's method and student."""
    from distillctl.config import build_recipe

    train = dict(spec.train)
    batch = int(train.get("batch_size", 256))
    schedule = budget_schedule(budget_images or spec.budget.images, batch, dataset_size, spec.budget.warmup_fraction)
    base = {
        "name": f"{spec.name}-{cell.key}", "out": str(run_dir),
        "teacher": {"source": "none"}, "student": {"arch": cell.arch},
        "method": {"name": cell.method, "params": dict(spec.method_params.get(cell.method, {}))},
        "data": {"train": data, "val": None, "image_size": image_size or spec.data.image_size,
                 "crop_pct": spec.data.crop_pct, "mean": spec.data.mean, "std": spec.data.std},
        "train": {**train, **schedule, "device": device},
        "eval": {"teacher": False, "random_student": False, "linear": False},
        "export": {"enabled": False},
    }
    try:
        return build_recipe(base)
    except UsageError as exc:
        raise UsageError(f"protocol {spec.name}, cell {cell.method} × {cell.arch}: {exc.message}", hint=exc.hint) from None


@dataclass
class Plan:
    """A validated invocation: nothing is written before it exists."""

    spec: ProtocolSpec
    inputs: ProtocolInputs
    cells: list[Cell]
    archs: list[str]
    dataset_size: int
    data_sha256: str
    splits: Any  # LabelledSplits of eval_train / eval_val
    image_size: int
    device: str  # resolved (auto → cuda or cpu) for the evaluations; cells get the flag as given

    def run_dir(self, cell: Cell) -> Path:
        return self.inputs.out / "runs" / cell.key

    def recipe(self, cell: Cell):
        return _cell_recipe(self.spec, cell, self.inputs.data, self.run_dir(cell), self.dataset_size,
                            self.inputs.device, self.inputs.budget_images, self.inputs.image_size)


def plan(spec: ProtocolSpec, inputs: ProtocolInputs) -> Plan:
    """Check every input before anything is written (exit 2 with one line on the first problem)."""
    from distillctl.data.datasets import open_dataset
    from distillctl.data.preprocess import check_image_size, student_stride
    from distillctl.data.splits import labelled_splits

    from distillctl.pipeline import resolve_device
    from distillctl.train.distributed import launched_by_torchrun

    if launched_by_torchrun():  # every rank would run (and write) every cell and floor
        raise UsageError("distillctl protocol run runs in one process; launch it without torchrun",
                         hint="pass --device cuda; the cells run one after another on it")
    device = resolve_device(inputs.device)
    if not (device == "cpu" or device.startswith("cuda")):
        raise UsageError(f"unknown device '{inputs.device}'; valid: auto, cpu, cuda, cuda:N")
    methods = list(dict.fromkeys(inputs.methods or spec.grid.methods))
    archs = list(dict.fromkeys(_check_grid(methods, list(inputs.archs or spec.grid.archs))))  # aliases folded
    image_size = inputs.image_size or spec.data.image_size
    for arch in archs:
        check_image_size(image_size, arch, student_stride(arch))
    if inputs.budget_images is not None and inputs.budget_images < 1:
        raise UsageError(f"--budget-images must be at least 1, got {inputs.budget_images}")
    for flag, source in (("--data", inputs.data), ("--eval-train", inputs.eval_train), ("--eval-val", inputs.eval_val)):
        if not source.startswith("builtin:") and not Path(source).expanduser().exists():
            raise InputError(f"{flag} {source} does not exist")
    if inputs.out.exists() and not inputs.out.is_dir():
        raise InputError(f"--out {inputs.out} is a file, not a directory")
    pretrain_data = open_dataset(inputs.data, "train")
    batch = int(spec.train.get("batch_size", 256))
    if len(pretrain_data) < batch:
        raise InputError(f"--data {inputs.data} has {len(pretrain_data)} images, fewer than one batch of {batch}",
                         hint="use more images, or a protocol file with a smaller train.batch_size")
    splits = labelled_splits(inputs.eval_train, inputs.eval_val)
    if len(splits.train.classes) < 2:
        raise InputError(f"--eval-train {inputs.eval_train} has {len(splits.train.classes)} class; the labelled "
                         "evaluation needs an ImageFolder with two or more class folders")
    cells = [Cell(method, arch) for method in methods for arch in archs]
    result = Plan(spec, inputs, cells, archs, len(pretrain_data), pretrain_data.manifest_hash(), splits, image_size,
                  device)
    for cell in cells:
        result.recipe(cell)  # every cell's recipe validates (method params, train keys)
    return result


# --- evaluation ----------------------------------------------------------------------------------

def evaluate_encoder(model, splits, input_size: int, mean, std, crop_pct: float, settings: ProtocolEval,
                     seed: int, device: str) -> dict:
    """kNN and linear probe of a frozen network on the labelled splits (the eval-train split is the kNN bank)."""
    from distillctl.eval.features import embed_dataset, eval_transform
    from distillctl.eval.knn import knn_evaluate, knn_protocol
    from distillctl.eval.linear import LinearProbeConfig, linear_probe_embeddings

    kwargs = dict(input_size=input_size, mean=mean, std=std, crop_pct=crop_pct, batch_size=settings.batch_size,
                  device=device)
    bank, bank_labels = embed_dataset(model, splits.train, **kwargs)
    queries, query_labels = embed_dataset(model, splits.test, **kwargs)
    classes = len(splits.train.classes)
    ks = tuple(settings.knn_k)
    scores = knn_evaluate(bank, bank_labels, queries, query_labels, ks=ks, temperature=settings.knn_temperature,
                          num_classes=classes, device=device)
    config = LinearProbeConfig(lrs=tuple(settings.linear_lrs), weight_decays=tuple(settings.linear_weight_decays),
                               epochs=settings.linear_epochs, seed=seed)
    probe = linear_probe_embeddings(bank, bank_labels, queries, query_labels, config, num_classes=classes, device=device)
    transform = eval_transform(input_size, mean, std, crop_pct)
    return {"knn": {str(k): round(v, 3) for k, v in sorted(scores.items())}, "knn_top1": round(scores[ks[0]], 3),
            "linear_top1": probe.top1, "linear": probe.to_dict(),
            "protocol": {"knn": {**knn_protocol(ks, settings.knn_temperature), "bank": "eval-train split"},
                         "transform": transform, "bn": "eval"},
            "data": {"eval_train": splits.train_source, "eval_val": splits.test_source,
                     "n_train": len(splits.train), "n_val": len(splits.test), "num_classes": classes}}


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _eval_identity(plan_: Plan) -> tuple:
    return (plan_.spec.data.crop_pct, plan_.spec.eval.model_dump(mode="json"),
            plan_.splits.train.manifest_hash(), plan_.splits.test.manifest_hash())


def _cell_fingerprint(plan_: Plan, cell: Cell) -> str:
    recipe = plan_.recipe(cell).model_dump(mode="json")
    recipe.pop("out")
    recipe["data"].pop("train")  # the data by content, never by path
    recipe["train"].pop("device")
    return _fingerprint(plan_.spec.name, recipe, plan_.data_sha256, _eval_identity(plan_))


def cell_finished(plan_: Plan, cell: Cell) -> bool:
    marker = plan_.run_dir(cell) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == _cell_fingerprint(plan_, cell)
    except (OSError, ValueError):
        return False


def run_cell(plan_: Plan, cell: Cell, quiet: bool = False) -> dict:
    """Pre-train (or resume) the cell's run, evaluate its student, record both; returns the cell's summary."""
    from distillctl.pipeline import RunOptions, run_pipeline
    from distillctl.rundir import RunDir
    from distillctl.runlock import hold
    from distillctl.students import load_student

    run_dir = plan_.run_dir(cell)
    started = time.monotonic()
    # one lock over training, evaluation and the summary/marker writes (run_pipeline's own hold nests inside it),
    # so a second `distillctl protocol` or `run` on this cell cannot interleave with the summary update
    with hold(run_dir, f"protocol {plan_.spec.name}"):
        run_pipeline(plan_.recipe(cell), RunOptions(quiet=quiet))
        phase(f"protocol: evaluating {cell.method} × {cell.arch} on the labelled splits")
        student, config = load_student(run_dir)
        seed = int(plan_.spec.train.get("seed", 0))
        result = evaluate_encoder(student, plan_.splits, int(config.input_size[-1]), config.mean, config.std,
                                  plan_.spec.data.crop_pct, plan_.spec.eval, seed, plan_.device)
        summary = RunDir(run_dir).update_summary({"protocol": {"name": plan_.spec.name, "method": cell.method,
                                                               "arch": cell.arch, "eval": result}})
        atomic_write_json(run_dir / MARKER, {"fingerprint": _cell_fingerprint(plan_, cell), "method": cell.method,
                                             "arch": cell.arch, "protocol": plan_.spec.name,
                                             "wall_s": round(time.monotonic() - started, 2)})
    return summary


def _mean_std(spec: ProtocolSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation every cell trains with (no teacher: the protocol's, else ImageNet's, as in pretrain)."""
    return tuple(spec.data.mean or IMAGENET_MEAN), tuple(spec.data.std or IMAGENET_STD)


def floor_path(plan_: Plan, arch: str) -> Path:
    return plan_.inputs.out / "floors" / f"{slug(arch)}.json"


def run_floor(plan_: Plan, arch: str) -> dict:
    """The random-init student of ``arch`` (seeded as a cell's student is), evaluated like the cells; reused
    when its fingerprint matches."""
    import torch

    from distillctl.students import create_backbone

    seed = int(plan_.spec.train.get("seed", 0))
    mean, std = _mean_std(plan_.spec)
    fingerprint = _fingerprint(arch, plan_.image_size, seed, mean, std, _eval_identity(plan_))
    path = floor_path(plan_, arch)
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
            if recorded.get("fingerprint") == fingerprint:
                return recorded
        except (OSError, ValueError):
            pass
    phase(f"protocol: evaluating the random-init {arch} (the floor)")
    torch.manual_seed(seed)  # the initialisation a cell's student starts from
    model = create_backbone(arch, img_size=plan_.image_size).eval()
    result = evaluate_encoder(model, plan_.splits, plan_.image_size, mean, std, plan_.spec.data.crop_pct,
                              plan_.spec.eval, seed, plan_.device)
    record = {"fingerprint": fingerprint, "arch": arch, "seed": seed, "eval": result}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return record


# --- running and the table -----------------------------------------------------------------------

def run_protocol(plan_: Plan, quiet: bool = False) -> dict:
    """Every floor and cell (finished ones skipped), then the results table; returns results.json's content."""
    out = plan_.inputs.out
    out.mkdir(parents=True, exist_ok=True)
    from distillctl.protocol_results import inputs_record

    atomic_write_json(out / "protocol.json", {"protocol": plan_.spec.model_dump(mode="json"),
                                              "inputs": inputs_record(plan_)})
    for arch in plan_.archs:
        run_floor(plan_, arch)
    for index, cell in enumerate(plan_.cells, start=1):
        label = f"cell {index}/{len(plan_.cells)} {cell.method} × {cell.arch}"
        if cell_finished(plan_, cell):
            log.info(f"protocol: {label}: finished earlier with the same inputs; skipped")
            continue
        log.info(f"protocol: {label}: pre-training {plan_.recipe(cell).train.epochs} epoch(s) in {plan_.run_dir(cell)}")
        run_cell(plan_, cell, quiet=quiet)
        write_results(plan_)  # the table grows as cells finish
    return write_results(plan_)


def write_results(plan_: Plan) -> dict:
    """results.json and results.md (see :mod:`distillctl.protocol_results`)."""
    from distillctl.protocol_results import write_results as write

    return write(plan_)
