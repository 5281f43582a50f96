"""Recipes: strict pydantic models, YAML loading (safe_load only) and ``--set a.b=value`` overrides.

Every CLI flag of ``distillctl run`` maps to one key here; the fully resolved recipe is written into the
run directory as ``recipe.yaml``. Unknown keys are errors that name the key and the nearest valid ones.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from distillctl.errors import InputError, UsageError
from distillctl.gates import GatesConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def typed_method_params(method: str, params: dict[str, Any], where: str) -> BaseModel:
    """``params`` validated once against the method's ``Params`` model (bounds, choices, unknown keys → exit 2)."""
    from distillctl.methods.base import get_method

    params_model = get_method(method).Params
    try:
        return params_model(**params)
    except ValidationError as exc:
        from distillctl.methods.domains import params_error

        raise params_error(exc, params_model, method, where) from exc


class _MethodSection(Strict):
    """A method name with its parameters, typed once when the recipe is built (``typed_params``)."""

    _typed: BaseModel | None = PrivateAttr(default=None)
    _typed_from: dict[str, Any] | None = PrivateAttr(default=None)

    def _type_now(self, method: str, where: str) -> None:
        self._typed = typed_method_params(method, self.params, where)
        self._typed_from = dict(self.params)

    @property
    def typed_params(self) -> BaseModel:
        """The method's ``Params`` instance; the trainer and the method get this object, never the raw dict.

        Typed when the section is validated; a ``model_copy(update=...)`` (which skips validation, e.g. the
        preset policy) is typed again on first use, so the instance always matches ``params``."""
        if self._typed is None or self._typed_from != self.params:
            self._type_now(*self._method_and_where())
        assert self._typed is not None
        return self._typed

    def _method_and_where(self) -> tuple[str, str]:
        raise NotImplementedError


class PretrainSpec(_MethodSection):
    """An SSL teacher trained first by the tool itself (``teacher.source: pretrain``)."""

    method: str = "mocov2"
    arch: str = "resnet18"
    epochs: int = Field(20, ge=1, le=100000)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(0.06, gt=0)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _type_params(self) -> "PretrainSpec":
        self._type_now(*self._method_and_where())
        return self

    def _method_and_where(self) -> tuple[str, str]:
        return self.method, "teacher.pretrain.params"


class TeacherSource(Strict):
    """Where one teacher comes from and how it is verified: ``teacher`` itself and each ``teacher.extra`` entry."""

    # registry name/alias, timm:<name>, a local file, "pretrain", or "scratch" (random init, trained by a
    # co-trained method: dogo, oss, simdis online; needs arch)
    source: str
    arch: str | None = None  # for local files and scratch: a timm model name
    format: str | None = None  # checkpoint family for local files (auto-detected when None)
    accept_license: bool = False
    sha256: str | None = None
    no_verify: bool = False
    mirror: str | None = None
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec)


class ExtraTeacher(TeacherSource):
    """One more teacher for multi-teacher methods (``simreg-multi``): the same source forms as ``teacher.source``."""


class TeacherConfig(TeacherSource):
    source: str = "pretrain"
    bn: Literal["eval", "train", "method"] = "method"  # "method": the method's documented default
    mode: Literal["auto", "online", "cached"] = "auto"  # auto: cached when the method allows it
    cache: str | None = None  # cache directory (default: <run>/cache)
    cache_views: int = Field(4, ge=1, le=64)
    # further teachers, in order (teacher k answers outputs pooled_k / proj_k; 0 is `source`)
    extra: list[ExtraTeacher] = Field(default_factory=list, max_length=16)


class StudentSpec(Strict):
    arch: str = "mobilenetv2"
    # timm constructor keywords, e.g. {patch_size: 8, depth: 6} for a small-patch ViT; written to
    # student/config.json (model_kwargs) with the img_size the run adds for fixed-size models
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kwargs")
    @classmethod
    def _no_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted({"num_classes", "pretrained", "img_size"} & set(value))
        if reserved:
            raise ValueError(f"{', '.join(reserved)} are set by distillctl (img_size follows data.image_size)")
        return value


class MethodConfig(_MethodSection):
    name: str = "simreg"
    # published: the paper's values; auto: size-dependent values (queues, warm-ups, lr, EMA momentum) derived
    # from the dataset, batch and budget (distillctl/methods/presets.py); explicit params/train keys always win
    preset: Literal["auto", "published"] = "auto"
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _type_params(self) -> "MethodConfig":
        self._type_now(*self._method_and_where())
        return self

    def _method_and_where(self) -> tuple[str, str]:
        return self.name, "method.params"


class DataConfig(Strict):
    train: str = "builtin:digits"
    val: str | None = None
    image_size: int = Field(224, ge=8, le=1024)
    crop_pct: float = Field(0.875, gt=0, le=1.0)
    mean: tuple[float, float, float] | None = None  # default: the teacher's preprocessing
    std: tuple[float, float, float] | None = None
    num_workers: int = Field(0, ge=0, le=128)
    # decoded training images kept in memory across epochs (MiB; 0: decode every epoch; in-process loader only)
    decode_cache_mb: int = Field(1024, ge=0, le=1 << 20)
    subset: int | None = Field(None, ge=1)  # first N images of a seeded permutation
    max_bad_fraction: float = Field(0.01, ge=0, le=1)


class TrainConfig(Strict):
    epochs: int = Field(100, ge=1, le=100000)
    batch_size: int = Field(256, ge=2, le=1 << 20)  # global batch, whatever the world size
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = Field(0.05, gt=0, le=100)
    lr_scaling: Literal["none", "linear"] = "none"  # linear: lr × batch/256
    weight_decay: float = Field(1e-4, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = Field(None, gt=0)
    grad_accum: int = Field(1, ge=1, le=1024)  # micro-batches per process per step (global batch unchanged)
    sync_bn: bool = False  # under DDP: student BatchNorm statistics over the global batch (SyncBatchNorm)
    resume: Literal["auto", "required"] = "auto"  # auto: continue from a matching checkpoint; required: = --resume
    device: str = "auto"
    threads: int | None = Field(None, ge=1, le=1024)  # intra-op threads per process; None: auto (train/threads.py)
    seed: int = 0
    max_steps: int | None = Field(None, ge=1)  # stop early (debug/benchmarks); the schedule still spans epochs
    log_every: int = Field(10, ge=1)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    checkpoint_every_minutes: float | None = Field(15.0, gt=0)
    keep_last: int = Field(2, ge=1, le=100)
    tensorboard: bool = False


class EvalConfig(Strict):
    knn_k: list[int] = Field(default_factory=lambda: [20])
    knn_temperature: float = Field(0.07, gt=0)
    linear: bool = False
    teacher: bool = True  # evaluate the teacher too, under the same protocol
    random_student: bool = True  # and a randomly initialised student (the floor a method must beat)
    batch_size: int = Field(256, ge=1)

    @field_validator("knn_k")
    @classmethod
    def _positive_k(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("knn_k must be a non-empty list of positive integers")
        return value


class ExportConfig(Strict):
    formats: list[Literal["onnx", "onnx-fp16", "onnx-int8", "openvino", "openvino-int8", "engine", "engine-int8"]] = Field(default_factory=lambda: ["onnx"])
    calib_data: str | None = None  # default: the run's training data
    calib_size: int = Field(512, ge=1)
    # auto: minmax, percentile and entropy ranked by cosine, the first within the kNN budget kept (every try recorded)
    calib_method: Literal["auto", "minmax", "percentile", "entropy"] = "auto"
    int8_form: Literal["auto", "qdq-u8s8", "qoperator-u8s8", "qdq-s8s8"] = "auto"  # student.int8.onnx layout
    slim: bool = False  # onnxslim clean-up of the fp32 graph, kept only if it passes parity (distillctl[slim])
    max_drop: float = Field(1.0, ge=0)  # INT8 kNN top-1 budget, points
    half: bool = False  # TensorRT fp16 engine
    parity_images: int = Field(64, ge=4)
    exporter: Literal["dynamo", "legacy"] = "dynamo"
    enabled: bool = True


class Recipe(Strict):
    name: str = "run"
    description: str | None = None
    out: str | None = None  # default: runs/<name>
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentSpec = Field(default_factory=StudentSpec)
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    # written by the run: every value chosen for it rather than by the user (method.preset, the teacher's
    # preprocessing), key -> {value, published, reason}; recomputed on every run, so an input value is ignored
    derived: dict[str, dict[str, Any]] = Field(default_factory=dict)
    gates: GatesConfig = Field(default_factory=GatesConfig)  # quality gates (distillctl/gates.py); never fingerprinted
    prune: bool = True  # a successful run deletes what it no longer needs (distillctl/prune.py); never fingerprinted

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _valid_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None) if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "recipe") -> UsageError:
    """First validation problem as one line; unknown keys name the nearest valid ones."""
    error = exc.errors()[0]
    location = [str(p) for p in error["loc"]]
    dotted = ".".join(location)
    if error["type"] == "extra_forbidden":
        valid = _valid_keys(model, location[:-1])
        close = difflib.get_close_matches(location[-1], valid, n=3, cutoff=0.5)
        hint = f"did you mean: {', '.join(close)}?" if close else (f"valid keys: {', '.join(valid)}" if valid else None)
        return UsageError(f"{prefix}: unknown key '{dotted}'", hint=hint)
    return UsageError(f"{prefix}: invalid value for '{dotted}': {error['msg']}")


Overrides = Mapping[str, Any]
"""Recipe overrides: dotted key (``train.lr``) → typed value. CLI flags arrive here with the type Typer gave them
(``--name 2024`` stays the string "2024"); only ``--set key=value`` text is parsed as YAML (:func:`parse_set`)."""


def parse_value(text: str) -> Any:
    """``--set`` values are parsed as YAML scalars/lists (safe_load): 0.1, true, [10,20], null, strings."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``--set a.b=value`` strings → overrides; the value is YAML (``[10, 20]``, ``true``, ``null``), the key is not."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects key=value, got '{item}'", hint="e.g. --set train.lr=0.1")
        overrides[key.strip()] = parse_value(value)
    return overrides


def apply_overrides(data: dict, overrides: Overrides | Iterable[str]) -> dict:
    """Assign each dotted key of ``overrides`` in the nested dict ``data`` (creating sections on the way).

    A mapping carries typed values and is used as given; an iterable of ``key=value`` strings is ``--set`` text
    and goes through :func:`parse_set` first. Later keys win, so flags-then-``--set`` lets ``--set`` decide.
    """
    if not isinstance(overrides, Mapping):
        overrides = parse_set(overrides)
    for key, value in overrides.items():
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UsageError(f"override has an empty key: '{key}'")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, dict):
                child = node[part] = dict(child)  # never mutate the caller's nested sections
            else:
                raise UsageError(f"override {key}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def recipe_search_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [Path.cwd() / "recipes", here.parent / "recipes", here / "recipes"]


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        raise InputError(f"recipe file not found: {name_or_path}")
    for directory in recipe_search_dirs():
        candidate = directory / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    from distillctl.errors import unknown_name

    raise unknown_name("recipe", name_or_path, [p.stem for p in list_recipes()])


def yaml_files(directories: list[Path]) -> list[Path]:
    """The ``*.yaml`` files of ``directories`` by name; a name in an earlier directory shadows a later one."""
    seen: dict[str, Path] = {}
    for directory in directories:
        if directory.is_dir():
            for path in sorted(directory.glob("*.yaml")):
                seen.setdefault(path.stem, path)
    return [seen[k] for k in sorted(seen)]


def list_recipes() -> list[Path]:
    return yaml_files(recipe_search_dirs())


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read recipe {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UsageError(f"recipe {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must be a mapping of sections (teacher:, student:, method:, …)")
    return data


def build_recipe(base: dict | None = None, overrides: Overrides | Iterable[str] | None = None,
                 sets: Iterable[str] = ()) -> Recipe:
    """The validated recipe: ``base`` (a recipe file's mapping), then typed ``overrides``, then ``--set`` text."""
    data = apply_overrides(dict(base or {}), overrides or {})
    data = apply_overrides(data, parse_set(sets))
    try:
        return Recipe(**data)
    except ValidationError as exc:
        raise format_validation_error(exc, Recipe) from exc


def load_recipe(name_or_path: str | None, overrides: Overrides | Iterable[str] | None = None,
                sets: Iterable[str] = ()) -> Recipe:
    """A recipe file (or the defaults) with flag overrides and ``--set`` assignments applied, validated."""
    base = read_yaml(find_recipe(name_or_path)) if name_or_path else {}
    return build_recipe(base, overrides, sets)
