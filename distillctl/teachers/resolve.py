"""``load_teacher``: turn a teacher spec (registry name/alias, ``timm:<tag>``, local file) into a
verified, converted, frozen :class:`~distillctl.teachers.base.Teacher`.

Registry teachers go fetch -> verify (pinned / ``--sha256`` / TOFU lock) -> convert (family rules +
structural check) -> store (safetensors + manifest); once stored, loads read only the store.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from distillctl.errors import GateError, InputError, UsageError, unknown_name
from distillctl.teachers.archs import (ArchSpec, build_backbone, build_classifier_model, classifier_prefix,
                                       head_output_dim, infer_head_layout, parse_arch)
from distillctl.teachers.base import Preprocess, Teacher
from distillctl.teachers.convert import Converted, check_structure, convert, detect_family, read_checkpoint
from distillctl.teachers.fetch import (entry_urls, expected_hash, fetch_urls, import_file, log, mirrored, sha256_file,
                                       teacher_dir, teacher_lock)
from distillctl.teachers.registry import TeacherEntry, load_registry
from distillctl.teachers.store import Stored, load_converted, read_manifest, save_converted

CONVERTER_VERSION = 1
LOCAL_FORMATS = ("plain", "classifier")


def license_gate(name: str, license_id: str, requires_acceptance: bool, accept_license: bool) -> None:
    """Non-commercial and custom licences must be accepted explicitly (a student is arguably a derivative)."""
    if requires_acceptance and not accept_license:
        raise UsageError(f"teacher '{name}' is licensed {license_id} (non-commercial or custom terms); "
                         "the distilled student inherits them",
                         hint="pass --accept-license (or accept_license: true in the recipe) to use it")


def license_requires_acceptance(license_id: str | None) -> bool:
    """For licences named by strings (timm cfgs): NC terms, SEER/DINOv3-style custom licences, 'other'."""
    text = (license_id or "").lower()
    return bool(re.search(r"(^|[-_ ])nc([-_ ]|$)", text)) or "non-commercial" in text or text.endswith("license") \
        or text in ("other", "custom")


# --- registry entries -------------------------------------------------------------------------

def _convert_entry_file(entry: TeacherEntry, path: Path) -> tuple[nn.Module, nn.Module | None, Converted]:
    registry = load_registry()
    model = build_classifier_model(entry.arch)
    converted = convert(read_checkpoint(path), entry.family, registry.rules_for(entry), model, entry.arch)
    head_layout = entry.head.layout if entry.head else None
    backbone, head = check_structure(converted, entry.arch, model, entry.expect.missing, entry.expect.unexpected,
                                     head_layout, what=f"{path.name} (teacher '{entry.name}')")
    features = getattr(backbone, "num_features", None)
    if features != entry.embed_dim:
        raise InputError(f"teacher '{entry.name}': backbone gives {features}-d features, the registry says {entry.embed_dim}")
    if head_layout and head_output_dim(head_layout) != entry.head_dim:
        raise InputError(f"teacher '{entry.name}': head layout ends at {head_output_dim(head_layout)}-d, registry says {entry.head_dim}")
    return backbone, head, converted


def _entry_meta(entry: TeacherEntry, raw_sha: str, verified: bool, converted: Converted, source: str) -> dict[str, Any]:
    return {"name": entry.name, "arch": entry.arch.model_dump(), "family": entry.family, "converter_version": CONVERTER_VERSION,
            "raw": {"filename": entry.filename, "sha256": raw_sha, "verified": verified, "source": source},
            "conversion": converted.report(), "embed_dim": entry.embed_dim, "license": entry.license.id}


def _usable_manifest(entry: TeacherEntry, manifest: dict | None, want_sha: str | None, no_verify: bool) -> bool:
    if manifest is None or manifest.get("arch") != entry.arch.model_dump() or manifest.get("family") != entry.family:
        return False
    if manifest.get("converter_version") != CONVERTER_VERSION or (entry.head is None) != (manifest.get("head") is None):
        return False
    if no_verify:
        return True
    raw = manifest.get("raw", {})
    return bool(raw.get("verified")) and want_sha is not None and raw.get("sha256") == want_sha


def prepare_entry(entry: TeacherEntry, *, sha256: str | None = None, no_verify: bool = False, mirror: str | None = None,
                  import_from: Path | None = None, force: bool = False) -> Stored:
    """Make sure the entry is downloaded (or imported), verified, converted and stored; load the store."""
    with teacher_lock(teacher_dir(entry.name)):
        return _prepare_entry(entry, sha256=sha256, no_verify=no_verify, mirror=mirror, import_from=import_from, force=force)


def _prepare_entry(entry: TeacherEntry, *, sha256: str | None, no_verify: bool, mirror: str | None,
                   import_from: Path | None, force: bool) -> Stored:
    folder = teacher_dir(entry.name)
    if entry.needs_explicit_convert:
        manifest = read_manifest(folder)
        if manifest is None or import_from is not None:
            raise UsageError(f"teacher '{entry.name}' is a {entry.format} file, which distillctl never opens implicitly",
                             hint=f"download {entry.sources[0].url} and run: distillctl teacher convert {entry.name} FILE")
        return load_converted(folder, manifest)
    md5 = entry.published_hash.md5_prefix if entry.published_hash else None
    expected = expected_hash(entry.name, entry.sha256, sha256, md5, entry.size)
    expected.sha256_prefix = entry.published_hash.sha256_prefix if entry.published_hash else None
    manifest = read_manifest(folder)
    if not force and import_from is None and _usable_manifest(entry, manifest, expected.sha256, no_verify):
        return load_converted(folder, manifest)
    if no_verify:
        log.warning("teacher '%s': hash verification disabled (--no-verify)", entry.name)
    parts: dict[str, Any] = {}

    def validate(path: Path) -> None:  # structural check before the file is trusted or recorded
        parts["result"] = _convert_entry_file(entry, path)

    raw = folder / entry.filename
    if import_from is not None:
        raw.unlink(missing_ok=True)
        raw_sha = import_file(entry.name, import_from, raw, expected, no_verify=no_verify, validate=validate)
        source = f"import:{import_from}"
    else:
        urls = entry_urls(entry, mirror)
        raw_sha = fetch_urls(entry.name, urls, raw, expected, no_verify=no_verify, validate=validate)
        source = urls[0]
    if "result" not in parts:
        validate(raw)
    backbone, head, converted = parts["result"]
    meta = _entry_meta(entry, raw_sha, not no_verify, converted, source)
    manifest = save_converted(folder, backbone, head, entry.head.layout if entry.head else None, meta)
    return load_converted(folder, manifest)


def _preprocess(entry: TeacherEntry) -> Preprocess:
    p = entry.preprocess
    return Preprocess(mean=p.mean, std=p.std, input_size=p.input_size, resize=p.resize, interpolation=p.interpolation,
                      origin=f"registry entry {entry.name}")


def _entry_teacher(entry: TeacherEntry, stored: Stored, mirror: str | None) -> Teacher:
    return Teacher(name=entry.name, arch=entry.arch.label(), backbone=stored.backbone, embed_dim=entry.embed_dim,
                   sha256=stored.sha256, projection=stored.head, proj_dim=entry.head_dim, license=entry.license.id,
                   preprocess=_preprocess(entry), source=f"registry:{entry_urls(entry, mirror)[0]}",
                   reference_top1=entry.reference.linear_top1)


# --- timm tags --------------------------------------------------------------------------------

def _timm_teacher(tag: str, *, accept_license: bool, sha256: str | None, no_verify: bool, mirror: str | None) -> Teacher:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(tag) if "." in tag else None
    except RuntimeError:  # "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        raise unknown_name("timm pretrained tag", tag, timm.list_pretrained(tag.split(".")[0] + "*")[:20] or ["<model.tag>"])
    name = f"timm:{tag}"
    license_gate(name, cfg.license or "unknown", license_requires_acceptance(cfg.license), accept_license)
    if cfg.hf_hub_id:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        url = f"{endpoint}/{cfg.hf_hub_id}/resolve/main/{getattr(cfg, 'hf_hub_filename', None) or 'model.safetensors'}"
    elif cfg.url:
        url = cfg.url
    else:
        raise InputError(f"timm tag '{tag}' has no downloadable weights")
    url = mirrored(url, mirror)
    spec = ArchSpec(builder="timm", name=tag, kwargs={})
    folder = teacher_dir(f"timm-{tag}")
    with teacher_lock(folder):
        stored = _fetch_timm(tag, name, url, spec, folder, sha256=sha256, no_verify=no_verify, license_id=cfg.license)
    size = cfg.input_size[-1]
    return Teacher(name=name, arch=tag, backbone=stored.backbone, embed_dim=int(stored.backbone.num_features),
                   sha256=stored.sha256, license=cfg.license or "unknown", source=f"timm:{url}",
                   preprocess=Preprocess(mean=tuple(cfg.mean), std=tuple(cfg.std), input_size=size,
                                         resize=int(math.floor(size / (cfg.crop_pct or 1.0))),
                                         interpolation=cfg.interpolation or "bicubic", crop_pct=cfg.crop_pct or 1.0,
                                         origin=f"timm pretrained cfg {tag}"))


def _fetch_timm(tag: str, name: str, url: str, spec: ArchSpec, folder: Path, *, sha256: str | None, no_verify: bool,
                license_id: str | None) -> Stored:
    expected = expected_hash(name, None, sha256)
    manifest = read_manifest(folder)
    raw_ok = manifest is not None and manifest.get("converter_version") == CONVERTER_VERSION and manifest.get("arch") == spec.model_dump()
    if not (raw_ok and (no_verify or (manifest["raw"].get("verified") and manifest["raw"]["sha256"] == expected.sha256))):
        parts: dict[str, Any] = {}

        def validate(path: Path) -> None:
            parts["backbone"] = _load_timm_file(tag, spec, path)

        raw = folder / url.rsplit("/", 1)[-1]
        raw_sha = fetch_urls(name, [url], raw, expected, no_verify=no_verify, validate=validate)
        if "backbone" not in parts:
            validate(raw)
        meta = {"name": name, "arch": spec.model_dump(), "family": "timm", "converter_version": CONVERTER_VERSION,
                "raw": {"filename": raw.name, "sha256": raw_sha, "verified": not no_verify, "source": url},
                "embed_dim": parts["backbone"].num_features, "license": license_id}
        manifest = save_converted(folder, parts["backbone"], None, None, meta)
    return load_converted(folder, manifest)


def _load_timm_file(tag: str, spec: ArchSpec, path: Path) -> nn.Module:
    """Apply the model's own ``checkpoint_filter_fn`` (as timm's pretrained loader does), drop the
    classifier, and load strictly into ``create_model(tag, num_classes=0)``."""
    import sys

    import timm
    from timm.models import model_entrypoint

    from distillctl.students import load_state_dict_strict

    state = read_checkpoint(path)
    model = timm.create_model(tag, pretrained=False)
    filter_fn = getattr(sys.modules[model_entrypoint(tag.split(".")[0]).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    prefix = classifier_prefix(spec, model)
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    backbone = build_backbone(spec)
    load_state_dict_strict(backbone, state, what=f"{path.name} (timm:{tag})")
    return backbone.eval()


# --- local files ------------------------------------------------------------------------------

def _stem(path: Path) -> str:
    for suffix in (".safetensors", ".pth.tar", ".pth", ".pt", ".tar", ".bin"):
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _sidecar_path(path: Path) -> Path:
    """``weights.json`` next to ``weights.safetensors``; for a distillctl student (``<run>/student/model.safetensors``)
    its ``config.json`` (arch, mean/std, input size: how the run fed it)."""
    candidate = path.with_name(_stem(path) + ".json")
    student_config = path.with_name("config.json")
    if not candidate.is_file() and path.name == "model.safetensors" and student_config.is_file():
        return student_config
    return candidate


def _sidecar(path: Path) -> dict[str, Any]:
    """The sidecar's contents (see :func:`_sidecar_path`), or {} when there is none. A distillctl student's
    config gets the crop_pct its run evaluated with, from the run's recipe.yaml.

    A sidecar that is there but unreadable is an error naming it: falling back to ImageNet mean/std and licence
    "unknown" would silently distil with the wrong normalisation."""
    candidate = _sidecar_path(path)
    if not candidate.is_file():
        return {}
    try:
        data = json.loads(candidate.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: malformed JSON or not UTF-8
        raise InputError(f"teacher sidecar {candidate} is not readable JSON: {exc}",
                         hint="fix or remove the file (it holds the teacher's arch, mean/std, input size, licence)") from exc
    problem = _sidecar_problem(data)
    if problem:
        raise InputError(f"teacher sidecar {candidate}: {problem}",
                         hint='e.g. {"arch": "resnet50", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}')
    recipe = candidate.parent.parent / "recipe.yaml"
    if candidate.name == "config.json" and "crop_pct" not in data and recipe.is_file():
        import yaml

        try:
            crop = ((yaml.safe_load(recipe.read_text()) or {}).get("data") or {}).get("crop_pct")
        except (OSError, yaml.YAMLError, AttributeError):
            crop = None
        if isinstance(crop, (int, float)):
            data = {**data, "crop_pct": float(crop)}
    return data


def _sidecar_problem(data: Any) -> str | None:
    """What is wrong with a parsed sidecar, or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    for key in ("mean", "std"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and len(value) == 3
                                      and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            return f"'{key}' must be a list of 3 numbers, got {value!r}"
    for key in ("arch", "license", "interpolation"):
        if data.get(key) is not None and not isinstance(data[key], str):
            return f"'{key}' must be a string, got {data[key]!r}"
    size = data.get("input_size")
    if size is not None and not (isinstance(size, list) and size and all(isinstance(v, int) and v > 0 for v in size)):
        return f"'input_size' must be a list of positive integers like [3, 224, 224], got {size!r}"
    crop = data.get("crop_pct")
    if crop is not None and not (isinstance(crop, (int, float)) and not isinstance(crop, bool) and 0 < crop <= 1):
        return f"'crop_pct' must be a number in (0, 1], got {crop!r}"
    return None


def _local_teacher(path: Path, arch: str | None, fmt: str | None, *, accept_license: bool, sha256: str | None,
                   no_verify: bool) -> Teacher:
    if not path.is_file():
        raise InputError(f"teacher file not found: {path}")
    sidecar = _sidecar(path)
    registry = load_registry()
    entry = registry.find(arch) if arch else None
    if entry is not None:  # a local copy of a registry teacher: that entry's rules, no copy into the cache
        license_gate(entry.name, entry.license.id, entry.license.requires_acceptance, accept_license)
        raw_sha = sha256_file(path)
        if sha256 and raw_sha != sha256.lower() and not no_verify:
            raise GateError(f"{path}: sha256 {raw_sha} != --sha256 {sha256}")
        backbone, head, converted = _convert_entry_file(entry, path)
        stored = _store_local(path, raw_sha, entry.family, entry.arch, backbone, head, entry.head.layout if entry.head else None, converted)
        teacher = _entry_teacher(entry, stored, None)
        teacher.source = f"local:{path}"
        return teacher
    arch = arch or sidecar.get("arch")
    if not arch:
        raise UsageError(f"local teacher {path} needs an architecture", hint="pass --teacher-arch, e.g. resnet50 or torchvision:resnet50")
    spec = parse_arch(arch)
    raw_sha = sha256_file(path)
    if sha256 and raw_sha != sha256.lower() and not no_verify:
        raise GateError(f"{path}: sha256 {raw_sha} != --sha256 {sha256}")
    obj = read_checkpoint(path)
    detected = detect_family(obj)
    family = fmt or detected
    if fmt is None:
        from distillctl.train.distributed import info as dist_info

        if dist_info().is_main:  # once per job, not once per rank
            log.info("teacher file %s: detected format %s", path.name, detected)
    if family == "unknown":
        raise InputError(f"cannot tell the format of {path}", hint="pass --teacher-format (plain, classifier, moco, moco3, swav, tv, dino, dinov2, simsiam, mae, ibot)")
    if family in LOCAL_FORMATS:
        stored = _load_plain(path, raw_sha, obj, spec, strip=(family == "classifier"))
    else:
        model = build_classifier_model(spec)
        rules = registry.families.get(family)
        if rules is None:
            raise unknown_name("teacher format", family, list(LOCAL_FORMATS) + sorted(registry.families))
        converted = convert(obj, family, rules, model, spec)
        layout = infer_head_layout(converted.head) if converted.head else None
        backbone, head = check_structure(converted, spec, model, None, [], layout, what=str(path))
        stored = _store_local(path, raw_sha, family, spec, backbone, head, layout, converted)
    preprocess = _sidecar_preprocess(sidecar, _sidecar_path(path).name)
    return Teacher(name=_stem(path), arch=spec.label(), backbone=stored.backbone, embed_dim=int(stored.backbone.num_features),
                   sha256=stored.sha256, projection=stored.head,
                   proj_dim=head_output_dim(stored.manifest["head"]["layout"]) if stored.head is not None else None,
                   license=str(sidecar.get("license", "unknown")), source=f"local:{path}", preprocess=preprocess)


SIDECAR_PREPROCESS_KEYS = ("input_size", "resize", "crop_pct", "mean", "std")


def _sidecar_preprocess(sidecar: dict[str, Any], name: str = "sidecar") -> Preprocess:
    """Preprocessing from a sidecar (``input_size`` [3,H,W], ``resize`` int or {"to": n}, optional ``crop_pct``);
    ImageNet defaults for what it does not state. ``{"resize": {"from": 32, "to": 64}}`` upsamples whole images,
    so the centre crop is the whole image (crop_pct = input size / resize = 1)."""
    size = int((sidecar.get("input_size") or [3, 224, 224])[-1])
    resize = sidecar.get("resize", 256 if size == 224 else size)
    if isinstance(resize, dict):
        resize = resize.get("to", size)
    stated = [key for key in SIDECAR_PREPROCESS_KEYS if key in sidecar]
    crop = sidecar.get("crop_pct")
    return Preprocess(mean=tuple(sidecar.get("mean", Preprocess.mean)), std=tuple(sidecar.get("std", Preprocess.std)),
                      input_size=size, resize=int(resize) if resize is not None else None,
                      interpolation=str(sidecar.get("interpolation", "bilinear")),
                      crop_pct=float(crop) if crop is not None else None,
                      origin=f"sidecar {name}" if stated else Preprocess.origin)


def _load_plain(path: Path, raw_sha: str, obj: dict, spec: ArchSpec, strip: bool) -> Stored:
    """A bare backbone state dict (optionally with a trailing classifier the format says to drop)."""
    from distillctl.students import load_state_dict_strict

    backbone = build_backbone(spec)
    state = obj
    if strip:
        prefix = classifier_prefix(spec, build_classifier_model(spec))
        state = {k: v for k, v in obj.items() if not k.startswith(prefix)}
    try:
        load_state_dict_strict(backbone, state, what=str(path))
    except InputError as exc:
        prefix = classifier_prefix(spec, build_classifier_model(spec))
        extra = set(state) - set(backbone.state_dict())
        if not strip and extra and all(k.startswith(prefix) for k in extra):
            exc.hint = f"the file carries a classifier ({prefix}*); pass --teacher-format classifier to drop it"
        raise
    backbone.eval()
    if path.suffix == ".safetensors" and not strip:
        return Stored(backbone, None, {"head": None}, raw_sha)  # the file itself is the converted weights
    converted = Converted("classifier" if strip else "plain", {k: v for k, v in state.items()})
    return _store_local(path, raw_sha, converted.family, spec, backbone, None, None, converted)


def _store_local(path: Path, raw_sha: str, family: str, spec: ArchSpec, backbone: nn.Module, head: nn.Module | None,
                 layout: str | None, converted: Converted) -> Stored:
    key = hashlib.sha256(f"{raw_sha}|{family}|{json.dumps(spec.model_dump(), sort_keys=True)}".encode()).hexdigest()[:16]
    folder = teacher_dir(f"local-{key}")
    with teacher_lock(folder):
        manifest = read_manifest(folder)
        if manifest is None or manifest.get("converter_version") != CONVERTER_VERSION:
            meta = {"name": path.name, "arch": spec.model_dump(), "family": family, "converter_version": CONVERTER_VERSION,
                    "raw": {"filename": path.name, "sha256": raw_sha, "verified": True, "source": f"local:{path}"},
                    "conversion": converted.report(), "embed_dim": int(backbone.num_features), "license": "unknown"}
            manifest = save_converted(folder, backbone, head, layout, meta)
        return load_converted(folder, manifest)


# --- public entry point -----------------------------------------------------------------------

def load_teacher(spec: str, arch: str | None = None, fmt: str | None = None, *, accept_license: bool = False,
                 sha256: str | None = None, no_verify: bool = False, mirror: str | None = None,
                 device: str = "cpu") -> Teacher:
    """Resolve ``spec`` (registry name/alias, ``timm:<tag>``, or a local file) to a frozen, eval-mode
    teacher on ``device``. Exit 2 for unknown names/bad files, exit 3 for hash mismatches."""
    spec = spec.strip()
    if spec.startswith("timm:"):
        teacher = _timm_teacher(spec[len("timm:"):], accept_license=accept_license, sha256=sha256,
                                no_verify=no_verify, mirror=mirror)
    elif _looks_like_path(spec) or (load_registry().find(spec) is None and Path(spec).expanduser().is_file()):
        teacher = _local_teacher(Path(spec).expanduser(), arch, fmt, accept_license=accept_license, sha256=sha256,
                                 no_verify=no_verify)
    else:
        entry = load_registry().resolve(spec)
        if spec != entry.name:
            log.info("teacher %s → %s", spec, entry.summary_line())
        if arch and parse_arch(arch).model_dump() != entry.arch.model_dump() and load_registry().find(arch) is not entry:
            raise UsageError(f"teacher '{entry.name}' is a {entry.arch.label()}; --teacher-arch {arch} does not apply",
                             hint="drop --teacher-arch for registry teachers")
        if fmt and fmt != entry.family:
            raise UsageError(f"teacher '{entry.name}' is a {entry.family} checkpoint, not {fmt}")
        license_gate(entry.name, entry.license.id, entry.license.requires_acceptance, accept_license)
        stored = prepare_entry(entry, sha256=sha256, no_verify=no_verify, mirror=mirror)
        teacher = _entry_teacher(entry, stored, mirror)
    teacher.freeze().to(device)
    teacher.set_bn_mode("eval")
    return teacher


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.startswith((".", "~")) or spec.endswith((".safetensors", ".pth", ".pt", ".tar", ".bin"))


__all__: list[str] = ["load_teacher", "prepare_entry", "license_gate", "entry_urls"]
