"""The teacher registry: named SSL checkpoints described as data (``registry.yaml``), one schema.

Entries are validated pydantic models (``extra="forbid"``), so a typo in the YAML fails loudly.
``families`` in the same file hold the default container/key rules of each checkpoint family; an
entry names its family and may override them. ``DISTILLCTL_REGISTRY`` may point to extra YAML
files (``os.pathsep``-separated, same format) whose entries are added or replace built-in ones,
e.g. to pin sha256 values or internal URLs on a cluster.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillctl.errors import InputError, unknown_name
from distillctl.teachers.archs import ArchSpec

REGISTRY_PATH = Path(__file__).with_name("registry.yaml")
FAMILIES = ("moco", "moco3", "swav", "tv", "dino", "dinov2", "simsiam", "mae", "ibot", "byol", "simclr1", "dinov3")
# Families whose files must be unpickled with dill (JAX/Haiku) or read with TensorFlow: never implicit.
EXTERNAL_FAMILIES = ("byol", "simclr1")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeyRules(_Strict):
    """How to find the backbone (and head) in a file.

    ``container``: candidate top-level keys to descend into, first present wins; ``""`` allows the
    top level itself. ``keep_prefix``: candidate backbone prefixes, first present wins (``""`` =
    every key). ``drop_prefix``: keys (after stripping) thrown away on purpose. ``head_prefix``:
    projection head keys (after stripping), kept apart; ``"@classifier"`` means the arch's
    classifier slot (``fc.`` for ResNets, ``head.`` for ViTs).
    """

    container: list[str] = Field(default_factory=list)
    keep_prefix: list[str] = Field(default_factory=lambda: [""])
    drop_prefix: list[str] = Field(default_factory=list)
    head_prefix: str | None = None


class Source(_Strict):
    url: str
    note: str | None = None


class PublishedHash(_Strict):
    md5_prefix: str | None = Field(default=None, pattern="^[0-9a-f]{4,32}$")
    # torch.hub convention: the '-<hex>' in a released file name is the start of its sha256 (DINOv3)
    sha256_prefix: str | None = Field(default=None, pattern="^[0-9a-f]{6,64}$")


class HeadSpec(_Strict):
    layout: str


class Expect(_Strict):
    """Missing/unexpected keys relative to the arch *with* its classifier (as main_lincls asserts).
    ``None`` means: missing = the classifier keys, unexpected = nothing."""

    missing: list[str] | None = None
    unexpected: list[str] = Field(default_factory=list)


class PreprocessSpec(_Strict):
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_size: int = 224
    resize: int | None = 256
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"


class Reference(_Strict):
    linear_top1: float | None = None
    protocol: str = ""
    source: str = ""


class License(_Strict):
    id: str
    commercial: bool
    note: str | None = None

    @property
    def requires_acceptance(self) -> bool:
        return not self.commercial


class TeacherEntry(_Strict):
    """One named teacher checkpoint."""

    name: str
    title: str
    aliases: list[str] = Field(default_factory=list)
    arch: ArchSpec
    family: str = Field(pattern="^(" + "|".join(FAMILIES) + ")$")
    format: Literal["torch", "dill-pkl", "tf1-ckpt"] = "torch"
    sources: list[Source] = Field(min_length=1)
    mirrors: list[Source] = Field(default_factory=list)
    filename: str
    published_hash: PublishedHash | None = None
    sha256: str | None = Field(default=None, pattern="^[0-9a-f]{64}$")
    size: int | None = None
    rules: KeyRules | None = None
    head: HeadSpec | None = None
    expect: Expect = Field(default_factory=Expect)
    embed_dim: int
    head_dim: int | None = None
    teacher_feature: Literal["backbone", "projection"] = "backbone"
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    reference: Reference = Field(default_factory=Reference)
    license: License
    notes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "TeacherEntry":
        if "/" in self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"filename must be a plain file name, got '{self.filename}'")
        if (self.head is None) != (self.head_dim is None):
            raise ValueError("head and head_dim go together")
        if self.teacher_feature == "projection" and self.head is None:
            raise ValueError("teacher_feature: projection needs a head")
        return self

    @property
    def needs_explicit_convert(self) -> bool:
        return self.family in EXTERNAL_FAMILIES

    def summary_line(self) -> str:
        top1 = f", linear {self.reference.linear_top1}%" if self.reference.linear_top1 is not None else ""
        return f"{self.name} ({self.title}{top1})"


class Registry(BaseModel):
    """All entries plus the per-family default key rules."""

    version: int
    families: dict[str, KeyRules]
    teachers: dict[str, TeacherEntry]

    def aliases(self) -> dict[str, str]:
        return {alias: entry.name for entry in self.teachers.values() for alias in entry.aliases}

    def names(self) -> list[str]:
        return sorted(self.teachers) + sorted(self.aliases())

    def resolve(self, name: str) -> TeacherEntry:
        """Canonical entry for a name or alias; unknown names exit 2 with suggestions."""
        key = name.strip()
        if key in self.teachers:
            return self.teachers[key]
        aliases = self.aliases()
        if key in aliases:
            return self.teachers[aliases[key]]
        raise unknown_name("teacher", name, self.names())

    def find(self, name: str) -> TeacherEntry | None:
        key = name.strip()
        return self.teachers.get(key) or self.teachers.get(self.aliases().get(key, ""))

    def rules_for(self, entry: TeacherEntry) -> KeyRules:
        return entry.rules if entry.rules is not None else self.families[entry.family]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read teacher registry {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"teacher registry {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"teacher registry {path} must be a mapping")
    return data


def _entries(data: dict[str, Any], path: Path) -> dict[str, TeacherEntry]:
    out: dict[str, TeacherEntry] = {}
    for name, body in (data.get("teachers") or {}).items():
        if not isinstance(body, dict):
            raise InputError(f"teacher registry {path}: entry '{name}' must be a mapping")
        try:
            out[name] = TeacherEntry(name=name, **body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InputError(f"teacher registry {path}: entry '{name}' field '{where}': {first['msg']}") from None
    return out


@lru_cache(maxsize=8)
def _load(paths: tuple[str, ...], stamps: tuple[str, ...]) -> Registry:
    base = _read_yaml(Path(paths[0]))
    families = {name: KeyRules(**rules) for name, rules in (base.get("families") or {}).items()}
    teachers = _entries(base, Path(paths[0]))
    for extra in paths[1:]:
        data = _read_yaml(Path(extra))
        families.update({name: KeyRules(**rules) for name, rules in (data.get("families") or {}).items()})
        teachers.update(_entries(data, Path(extra)))
    missing = sorted({entry.family for entry in teachers.values() if entry.rules is None} - set(families))
    if missing:
        raise InputError(f"teacher registry: no key rules for families {missing}")
    registry = Registry(version=int(base.get("version", 1)), families=families, teachers=teachers)
    seen: dict[str, str] = {}
    for entry in teachers.values():
        for alias in entry.aliases:
            if alias in teachers or seen.get(alias, entry.name) != entry.name:
                raise InputError(f"teacher registry: alias '{alias}' of '{entry.name}' is already taken")
            seen[alias] = entry.name
    return registry


def load_registry() -> Registry:
    """The built-in registry plus any files named by ``DISTILLCTL_REGISTRY`` (reloaded when they change)."""
    paths = [str(REGISTRY_PATH)] + [p for p in os.environ.get("DISTILLCTL_REGISTRY", "").split(os.pathsep) if p]
    stamps = []
    for path in paths:  # content digests, not mtimes: two quick edits can share a timestamp
        try:
            stamps.append(hashlib.sha1(Path(path).read_bytes(), usedforsecurity=False).hexdigest())
        except OSError:
            raise InputError(f"teacher registry file not found: {path}", hint="check DISTILLCTL_REGISTRY") from None
    return _load(tuple(paths), tuple(stamps))
