"""``distillctl run``: teacher → cache → distill → eval → export, each stage recorded in the run
manifest with a fingerprint of its inputs. A stage whose fingerprint is unchanged is skipped; one
whose inputs changed is redone (and so is everything downstream, whose fingerprints include it).
No ML logic lives here: each stage calls one module's entry function.

Under torchrun every rank runs this same function: the process group is initialised here (gloo on CPU,
NCCL on GPU). Every rank takes part in the cache build (shards split by rank), training (batch split by
rank) and evaluation (embeddings split by rank, gathered on rank 0); rank 0 alone writes files (recipe,
manifest, checkpoints, student, metrics, summary, exports) and every write is followed by a collective,
so the other ranks only read what rank 0 has finished writing.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar
from pathlib import Path

import torch

from distillctl import __version__, runlock
from distillctl.config import Recipe
from distillctl.data.bad_images import BadImages
from distillctl.data.datasets import ImageDataset
from distillctl.data.splits import labelled_splits
from distillctl.errors import InputError, UsageError
from distillctl.methods.base import TeacherDims, build_method, get_method, registry
from distillctl.methods.presets import queue_warnings  # noqa: F401  (re-exported: the queue policy lives there)
from distillctl.rundir import RunDir, file_sha256
from distillctl.resolution import adapt_teacher, check_student, check_teacher_views, student_model_kwargs
from distillctl.students import StudentConfig, count_parameters, create_backbone, feature_dim, resolve_arch
from distillctl.teachers.base import Teacher
from distillctl.teachers.from_run import load_run_as_teacher
from distillctl.pipeline_stages import EvalStage, ExportStage, Stage, TeacherStage, skipped
from distillctl.train import distributed
from distillctl.train.threads import apply_threads
from distillctl._infra import atomic_path, atomic_write_text, get_logger

log = get_logger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class RunOptions:
    resume: bool = False  # require a checkpoint to continue from (also: recipe train.resume: required)
    restart: bool = False  # discard checkpoints and finished stages
    quiet: bool = False


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"train.device={name} but no CUDA GPU is available", hint="use train.device=cpu or auto")
    return name


def run_dir_for(recipe: Recipe) -> RunDir:
    return RunDir(recipe.out or f"runs/{recipe.name}")


def validate(recipe: Recipe) -> tuple[ImageDataset, ImageDataset | None]:
    """Cheap checks before anything is written: names, values, data."""
    method_cls = get_method(recipe.method.name)
    resolve_arch(recipe.student.arch)  # method.params were typed when the recipe was built
    from distillctl.gates import check_recipe_gates

    check_recipe_gates(recipe)
    splits = labelled_splits(recipe.data.train, recipe.data.val)  # eval labels aligned to train's classes by name
    train_data, val_data = splits.train, splits.test
    if recipe.data.subset:
        import numpy as np

        order = np.random.default_rng(recipe.train.seed).permutation(len(train_data))[: recipe.data.subset]
        train_data = train_data.subset(np.sort(order))
    if method_cls.kind == "distill" and recipe.teacher.source in ("none", ""):
        raise UsageError(f"method {recipe.method.name} distils from a teacher; set --teacher")
    extra = recipe.teacher.extra
    if extra and not method_cls.multi_teacher:
        multi = sorted(name for name, cls in registry().items() if cls.multi_teacher)
        raise UsageError(f"method {recipe.method.name} distils one teacher, but teacher.extra lists {len(extra)} more",
                         hint=f"remove teacher.extra, or use a multi-teacher method ({', '.join(multi)})")
    if method_cls.multi_teacher and not extra:
        raise UsageError(f"method {recipe.method.name} distils two or more teachers; list the others in teacher.extra",
                         hint="e.g. teacher: {source: r50-moco, extra: [{source: r50-byol}]}")
    for source in [recipe.teacher.source] + [spec.source for spec in extra]:
        if source in ("none", "") and extra:
            raise UsageError("every teacher of a multi-teacher run needs a source ('none' is not one)")
        if source not in ("pretrain", "none", "scratch") and not source.startswith("timm:"):
            candidate = Path(source).expanduser()
            looks_like_path = "/" in source or candidate.suffix in (".pth", ".pt", ".tar", ".safetensors", ".bin")
            if looks_like_path and not candidate.is_file():
                raise InputError(f"teacher checkpoint not found: {source}")
    return train_data, val_data


# --- teacher -----------------------------------------------------------------------------------

def pretrain_recipe(recipe: Recipe, out: Path, spec=None) -> Recipe:
    """The nested recipe that trains a ``pretrain`` teacher (``spec``: its PretrainSpec, default teacher.pretrain)."""
    spec = spec or recipe.teacher.pretrain
    data = recipe.data.model_dump()
    return Recipe(
        name=f"{recipe.name}-teacher", out=str(out),
        teacher={"source": "none"}, student={"arch": spec.arch},
        method={"name": spec.method, "params": spec.params}, data=data,
        # resume "auto": the outer run decides whether --resume has something to continue (_check_resumable)
        train={**recipe.train.model_dump(), "epochs": spec.epochs, "batch_size": spec.batch_size, "lr": spec.lr,
               "max_steps": None, "resume": "auto"},
        eval={**recipe.eval.model_dump(), "teacher": False}, export={"enabled": False},
    )


def resolve_teacher(recipe: Recipe, run: RunDir, options: RunOptions, device: str) -> Teacher | None:
    """The run's teacher: ``teacher.source``, or with ``teacher.extra`` an ensemble of all of them (in order)."""
    first = _resolve_one(recipe.teacher, recipe, run.path / "teacher_pretrain", options, device)
    if first is None or not recipe.teacher.extra:
        return first
    from distillctl.teachers.ensemble import TeacherEnsemble

    members = [first] + [_resolve_one(spec, recipe, run.path / f"teacher_pretrain_{k}", options, device)
                         for k, spec in enumerate(recipe.teacher.extra, start=1)]
    return TeacherEnsemble.of(members)


def _resolve_one(spec, recipe: Recipe, pretrain_dir: Path, options: RunOptions, device: str) -> Teacher | None:
    """One teacher from a source spec (``teacher`` itself or an entry of ``teacher.extra``)."""
    source = spec.source
    if source in ("none", ""):
        return None
    if source == "scratch":  # trained with the student by a co-trained method (teachers/scratch.py)
        from distillctl.teachers.scratch import scratch_teacher

        return scratch_teacher(spec.arch, recipe.train.seed, recipe.data.image_size, recipe.data.crop_pct)
    if source == "pretrain":
        # the teacher's own training continues from its checkpoints on its own (auto-resume); --resume was
        # checked against every training stage of the outer run already
        nested = run_pipeline(pretrain_recipe(recipe, pretrain_dir, spec.pretrain), replace(options, resume=False))
        return load_run_as_teacher(RunDir(nested["run_dir"]), name=f"pretrain:{spec.pretrain.method}-"
                                   f"{spec.pretrain.arch}")
    try:
        from distillctl.teachers.resolve import load_teacher
    except ModuleNotFoundError as exc:  # pragma: no cover - the registry ships with the package
        raise UsageError(f"teacher registry unavailable: {exc}") from exc
    return load_teacher(source, spec.arch, spec.format, accept_license=spec.accept_license, sha256=spec.sha256,
                        no_verify=spec.no_verify, mirror=spec.mirror, device=device)


def _teacher_dims(teacher: Teacher | None):
    """What the method is built with: one TeacherDims, or one per member of an ensemble."""
    from distillctl.teachers.ensemble import TeacherEnsemble

    if teacher is None:
        return None
    if isinstance(teacher, TeacherEnsemble):
        return [TeacherDims(*dims) for dims in teacher.member_dims()]
    return TeacherDims(teacher.embed_dim, teacher.proj_dim, backbone=teacher.backbone, projection=teacher.projection)


def _warn_preprocess(teacher: Teacher | None, mean, std, quiet: bool) -> None:
    """Every member of an ensemble sees the run's normalisation; say which ones were trained with another."""
    from distillctl.teachers.ensemble import TeacherEnsemble, preprocess_mismatches

    if quiet or not distributed.info().is_main or not isinstance(teacher, TeacherEnsemble):
        return
    for name in preprocess_mismatches(teacher.members, mean, std):
        log.warning(f"teacher {name} was trained with another input normalisation than this run's (mean {list(mean)}, "
                    f"std {list(std)}); every teacher sees the run's (data.mean / data.std)")


def _images_seen(recipe: Recipe, train_images: int) -> int:
    from distillctl.train.loop import planned_steps

    steps_per_epoch = max(1, train_images // recipe.train.batch_size)
    return planned_steps(steps_per_epoch, recipe.train.epochs, recipe.train.max_steps) * recipe.train.batch_size


def _warn_queues(recipe: Recipe, method, train_images: int, quiet: bool) -> None:
    if quiet or not distributed.info().is_main:
        return
    for text in queue_warnings(method, train_images, _images_seen(recipe, train_images)):
        log.warning(text)


def _follow_teacher(recipe: Recipe, teacher: Teacher | None, quiet: bool) -> Recipe:
    """data.image_size / crop_pct / mean / std default to the teacher's preprocessing (data/preprocess.py);
    printed, recorded under ``derived``; a contradicting setting warns; a size too small for the student is
    refused (exit 2) or warned."""
    from distillctl.data import preprocess

    theirs = preprocess.from_teacher(teacher.preprocess, teacher.name) if teacher is not None else None
    current = recipe.data.model_dump()
    choices, warnings = preprocess.follow_teacher(current, recipe.data.model_fields_set, theirs)
    updates = {c.key.split(".", 1)[1]: tuple(c.value) if isinstance(c.value, list) else c.value for c in choices}
    data = recipe.data.model_copy(update=updates)
    recipe = recipe.model_copy(update={"data": data, "derived": {**recipe.derived,
                                                                  **{c.key: c.as_record() for c in choices}}})
    arch = resolve_arch(recipe.student.arch)
    size_warning = preprocess.check_image_size(data.image_size, arch, preprocess.student_stride(arch))
    if not quiet and distributed.info().is_main:
        log.info(preprocess.describe(choices, data.model_dump()))
        for text in warnings + ([size_warning] if size_warning else []):
            log.warning(text)
    return recipe


def _check_explicit_image_size(recipe: Recipe) -> None:
    """Refuse an explicitly set input size the student cannot use before any teacher is fetched (exit 2)."""
    if "image_size" in recipe.data.model_fields_set:
        from distillctl.data.preprocess import check_image_size, student_stride

        arch = resolve_arch(recipe.student.arch)
        check_image_size(recipe.data.image_size, arch, student_stride(arch))


def _apply_preset(recipe: Recipe, train_images: int, quiet: bool) -> Recipe:
    """``method.preset``: the size-dependent values of the method's recipe (methods/presets.py), printed and
    recorded in recipe.yaml under ``derived``."""
    from distillctl.methods.presets import describe, preset_recipe

    recipe, derived = preset_recipe(recipe, train_images, _images_seen(recipe, train_images))
    if not quiet and distributed.info().is_main:
        for line in describe(derived, recipe.method.preset):
            log.info(line)
    return recipe


# --- stages ------------------------------------------------------------------------------------

# ``--teacher-mode auto`` caches teacher taps (maps) only up to this size; above it the teacher runs online.
# A constant, not the free disk space: a resumed run must decide as the interrupted one did.
TAP_CACHE_AUTO_BYTES = 16 * 2**30


def tap_cache_bytes(teacher: Teacher, requirements, num_images: int, views: int) -> int:
    """The fp16 bytes the method's teacher taps would take in a feature cache of ``views`` views per image,
    from one probe forward of the teacher (eval mode, no gradient; its modes are restored)."""
    spec = next(view.spec for view in requirements.views if view.teacher)
    device = next(iter(teacher.backbone.parameters())).device
    modules = list(teacher.backbone.modules())
    modes = [module.training for module in modules]
    teacher.backbone.eval()
    try:
        with torch.no_grad():
            probe = teacher.forward(torch.zeros(1, 3, spec.size, spec.size, device=device), set(),
                                    taps=requirements.teacher_taps)
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    values = sum(int(probe[tap][0].numel()) for tap in requirements.teacher_taps)
    return 2 * values * views * num_images


def _teacher_mode(recipe: Recipe, requirements, teacher_bn: str, quiet: bool, teacher: Teacher | None = None,
                  num_images: int = 0) -> str:
    """none | cached | online | co_trained, by the one cacheability rule (methods.base.teacher_plan); under
    ``auto``, a method whose teacher taps would take more than :data:`TAP_CACHE_AUTO_BYTES` of cache runs its
    teacher online (``--teacher-mode cached`` still forces the cache)."""
    from distillctl.methods.base import teacher_plan

    plan = teacher_plan(requirements, teacher_bn, recipe.teacher.mode, method=recipe.method.name)
    note, mode = plan.note, plan.mode
    if mode == "cached" and recipe.teacher.mode == "auto" and requirements.teacher_taps and teacher is not None:
        _, views, turns = _cache_views(recipe, requirements)
        size = tap_cache_bytes(teacher, requirements, num_images, views * turns)
        if size > TAP_CACHE_AUTO_BYTES:
            mode = "online"
            note = (f"{recipe.method.name}: teacher runs online, not from a feature cache: its teacher taps "
                    f"({', '.join(requirements.teacher_taps)}) would take {size / 2**30:.1f} GiB for {num_images:,} "
                    f"images x {views} views (auto caches up to {TAP_CACHE_AUTO_BYTES // 2**30} GiB; "
                    "--teacher-mode cached forces it)")
    if note and not quiet and distributed.info().is_main:
        log.info(f"note: {note}")
    return mode


def _student_kwargs(recipe: Recipe, requirements=None) -> dict:
    """The student's constructor keywords for the sizes its views come in (recorded in config.json)."""
    sizes = [view.spec.size for view in requirements.views if view.student] if requirements is not None else []
    return student_model_kwargs(resolve_arch(recipe.student.arch), recipe.data.image_size, sizes, recipe.student.kwargs)


def _check_method_fits(recipe: Recipe, teacher: Teacher | None) -> None:
    """Build the student and the method once on a forked RNG and resolve the student's taps, so a method that
    cannot run on this student (a feature-map tap on a model without feature stages, ...) exits 2 before the run
    directory is written. The run builds both again from the run seed; nothing here touches its RNG."""
    from distillctl.taps import check_taps

    with torch.random.fork_rng(devices=[]):
        student = create_backbone(recipe.student.arch, model_kwargs=_student_kwargs(recipe))
        method = build_method(recipe.method.name, recipe.method.typed_params, feature_dim(student),
                              _teacher_dims(teacher))
        requirements = method.requirements(recipe.data.image_size)
        check_taps(student, requirements.student_taps, f"method {method.name}, student {recipe.student.arch}")


def _fit_student_to_views(student, recipe: Recipe, requirements):
    """Refuse sizes a ViT student cannot take; rebuild it with a dynamic grid when views come in several sizes
    (same seed and RNG state, so its initial weights are the ones it would have had)."""
    sizes = [view.spec.size for view in requirements.views if view.student] or [recipe.data.image_size]
    check_student(student, recipe.student.arch, sizes)
    kwargs = _student_kwargs(recipe, requirements)
    if not kwargs.get("dynamic_img_size"):
        return student
    state = torch.get_rng_state()
    torch.manual_seed(recipe.train.seed)
    rebuilt = create_backbone(recipe.student.arch, model_kwargs=kwargs)
    torch.set_rng_state(state)
    return rebuilt


def _write_student(run: RunDir, student, method, recipe: Recipe, teacher: Teacher | None, mean, std) -> StudentConfig:
    from safetensors.torch import save_file

    run.student_dir.mkdir(parents=True, exist_ok=True)
    arch = resolve_arch(recipe.student.arch)
    config = StudentConfig(arch=arch, num_features=feature_dim(student), input_size=[3, recipe.data.image_size,
                           recipe.data.image_size], mean=list(mean), std=list(std),
                           teacher=teacher.describe() if teacher else {}, method=recipe.method.name,
                           license=teacher.license if teacher else None,
                           model_kwargs=_student_kwargs(recipe, method.requirements(recipe.data.image_size)))
    try:  # both files written before either is renamed into place
        with atomic_path(run.student_dir / "model.safetensors") as tmp_model, \
                atomic_path(run.student_dir / "heads.safetensors") as tmp_heads:
            save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, str(tmp_model))
            save_file({k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}, str(tmp_heads))
    except (OSError, RuntimeError) as exc:  # e.g. ENOSPC: the checkpoints stay, the run can be resumed
        from distillctl.errors import TrainingError

        raise TrainingError(f"could not write the student to {run.student_dir}: {exc}",
                            hint="free disk space, then rerun the same command (training resumes from its checkpoint)") from exc
    atomic_write_text(run.student_dir / "config.json", config.to_json())
    return config


def _summary_head(recipe: Recipe, run: RunDir, method_cls, teacher_id, train_data, val_data, data_hash) -> dict:
    """The part of summary.json known before training (written first, so a failed run still reports it)."""
    return {
        "distillctl_version": __version__,
        "run_dir": str(run.path),
        "method": recipe.method.name,
        "method_kind": method_cls.kind,
        "teacher": {**teacher_id, "knn_top1": None} if teacher_id else None,
        "student": {"arch": resolve_arch(recipe.student.arch), "checkpoint": str(run.student_dir / "model.safetensors"),
                    "knn_top1": None, "knn": None},
        "data": {"train": recipe.data.train, "images": len(train_data), "manifest_sha256": data_hash,
                 "eval_images": len(val_data) if val_data else 0},
        "recipe": recipe.model_dump(mode="json"),
    }


def _load_cotrained_teacher(run: RunDir, teacher: Teacher) -> str:
    """Load ``student/teacher_cotrained.safetensors`` (the co-trained teacher as the distill stage ended) into
    ``teacher``; returns the file's sha256 (the eval fingerprint's teacher identity, so a retrained teacher is
    re-evaluated). The file is written on rank 0; under torchrun every rank reads it after that."""
    from safetensors.torch import load_file

    from distillctl.errors import TrainingError

    path = run.student_dir / "teacher_cotrained.safetensors"
    sha = distributed.broadcast_object(distributed.main_first(file_sha256, path) if path.is_file() else None)
    if sha is None:
        raise TrainingError(f"the co-trained teacher's weights are missing: {path}",
                            hint="rerun with --restart to train student and teacher again")
    teacher.load_state_dict(load_file(str(path)))
    teacher.to("cpu")
    return sha


def _write_cotrained_teacher(run: RunDir, teacher: Teacher) -> None:
    """A co-trained teacher's weights beside the student (``teacher_cotrained.safetensors``), for export."""
    from safetensors.torch import save_file

    teacher.to("cpu")
    with atomic_path(run.student_dir / "teacher_cotrained.safetensors") as tmp:
        save_file({k: v.detach().contiguous() for k, v in teacher.state_dict().items()}, str(tmp),
                  metadata={"arch": teacher.arch, "source": teacher.source})


def run_pipeline(recipe: Recipe, options: RunOptions | None = None) -> dict:
    """Run every stage (skipping finished ones); returns the summary dict."""
    options = options or RunOptions()
    started = time.monotonic()
    threads = apply_threads(recipe.train.threads, recipe.data.num_workers)  # before any teacher/cache/student compute
    device = resolve_device(recipe.train.device)
    distributed.init_from_env(torch.device(device).type)
    if not options.quiet and distributed.info().is_main:
        log.info(f"using {threads.describe()}")
    device = distributed.local_device(device)
    train_data, val_data = validate(recipe)
    _warn_data_faults(train_data, quiet=options.quiet)
    run = run_dir_for(recipe)
    # one writer per run directory (runlock.py), taken before anything in it is written or deleted (--restart
    # too); rank 0 holds it, a refusal is exit 2 on every rank
    lock = distributed.main_first(runlock.acquire, run.path)
    with lock or contextlib.nullcontext():
        return _run_stages(recipe, options, run, train_data, val_data, device, started)


def _run_stages(recipe: Recipe, options: RunOptions, run: RunDir, train_data: ImageDataset,
                val_data: ImageDataset | None, device: str, started: float) -> dict:
    """The stages of :func:`run_pipeline`, run while this process holds the run directory's lock."""
    method_cls = get_method(recipe.method.name)
    _check_resumable(recipe, run, options)

    _check_explicit_image_size(recipe)
    teacher = resolve_teacher(recipe, run, options, device)  # a bad teacher file fails before anything is written
    recipe = _follow_teacher(recipe, teacher, options.quiet)
    recipe = _apply_preset(recipe, len(train_data), options.quiet)
    if teacher is not None:  # a ViT teacher's position embeddings follow the run's image size (recorded)
        adapt_teacher(teacher, recipe.data.image_size, None if options.quiet or not distributed.info().is_main
                      else log.info)
    _check_method_fits(recipe, teacher)  # before anything is written
    distributed.main_first(run.write_recipe, recipe)
    mean = tuple(recipe.data.mean or (teacher.preprocess.mean if teacher else IMAGENET_MEAN))
    std = tuple(recipe.data.std or (teacher.preprocess.std if teacher else IMAGENET_STD))
    data_hash = train_data.manifest_hash()
    teacher_stage = TeacherStage(run, teacher.describe() if teacher else None)
    teacher_id = teacher_stage.run()
    summary = _summary_head(recipe, run, method_cls, teacher_id, train_data, val_data, data_hash)
    distributed.main_first(run.update_summary, summary)

    torch.manual_seed(recipe.train.seed)  # the student's (and heads') initialisation follows the run seed
    student = create_backbone(recipe.student.arch, model_kwargs=_student_kwargs(recipe))
    teacher_dims = _teacher_dims(teacher)
    _warn_preprocess(teacher, mean, std, options.quiet)
    method = build_method(recipe.method.name, recipe.method.typed_params, feature_dim(student), teacher_dims)
    _warn_queues(recipe, method, len(train_data), options.quiet)
    requirements = method.requirements(recipe.data.image_size)
    student = _fit_student_to_views(student, recipe, requirements)
    if teacher is not None:
        check_teacher_views(teacher, [view.spec.size for view in requirements.views if view.teacher])
    teacher_bn = requirements.teacher_bn if recipe.teacher.bn == "method" else recipe.teacher.bn
    if requirements.teacher_mode == "co_trained":
        teacher_bn = "train"  # a co-trained teacher always trains its BatchNorm
    elif recipe.teacher.source == "scratch":
        raise UsageError(f"teacher.source: scratch is a random network, and method {recipe.method.name} does not "
                         "train its teacher", hint="use a trained teacher, or a co-trained method (dogo, oss, "
                         "simdis with online: true)")
    mode = _teacher_mode(recipe, requirements, teacher_bn, options.quiet, teacher, len(train_data))
    if teacher:
        summary["teacher"].update(bn_mode=teacher_bn, mode=mode)

    cache = CacheStage(recipe, run, teacher, train_data, requirements, mean, std, device).run() \
        if mode == "cached" else None
    bags = _neighbour_bags(recipe, method, requirements, teacher, cache, train_data, mean, std, device)
    _teacher_artifact(recipe, run, method, requirements, teacher, cache, train_data, mean, std, device)
    train_summary = DistillStage(recipe, run, options, teacher_stage, train_data, method, student, teacher, cache,
                                 bags, mean, std, mode, teacher_bn, device).run()
    student_sha = distributed.main_first(file_sha256, run.student_dir / "model.safetensors")
    student_sha = distributed.broadcast_object(student_sha)
    summary["student"].update({"sha256": student_sha, "params": count_parameters(student)})
    summary["train"] = train_summary
    summary["data"]["faults"] = _data_faults(train_data, train_summary)
    distributed.main_first(run.update_summary, summary)  # summary.json holds every finished stage, whatever follows

    teacher_sha = teacher.sha256 if teacher else None
    if mode == "co_trained":  # evaluate the trained teacher, also when the distill stage was skipped on a rerun
        teacher_sha = _load_cotrained_teacher(run, teacher)
    eval_result = EvalStage(recipe, run, teacher, train_data, val_data, mean, std, device, student_sha,
                            teacher_sha).run()
    if teacher:
        summary["teacher"]["knn_top1"] = eval_result.get("teacher", {}).get("knn_top1")
    summary["student"].update(knn_top1=eval_result.get("student", {}).get("knn_top1"),
                              knn=eval_result.get("student", {}).get("knn"))
    summary["eval"] = eval_result
    distributed.main_first(run.update_summary, summary)
    return _export_and_gates(recipe, run, student_sha, summary, started)


def _export_and_gates(recipe: Recipe, run: RunDir, student_sha: str, summary: dict, started: float) -> dict:
    """Export, then the recipe's quality gates; summary.json is complete before any gate error is raised."""
    from distillctl.errors import GateError
    from distillctl.gates import check_run, failure_from_report

    errors: list[GateError] = []
    try:
        export_result = ExportStage(recipe, run, student_sha).run()
    except GateError as exc:  # export_run wrote its numbers into summary['export'] before raising
        export_result = None
        errors.append(exc)

    def finish() -> dict:
        run.update_summary({**summary, "export": export_result or {}, "wall_s": round(time.monotonic() - started, 2)})
        check_run(run.path, recipe.gates, raise_on_failure=False)
        return run.summary()

    full = distributed.broadcast_object(distributed.main_first(finish))
    gate_error = failure_from_report(full["gates"])
    errors += [gate_error] if gate_error else []
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise GateError(" || ".join(error.message for error in errors), hint=errors[-1].hint)
    if recipe.prune:
        full = distributed.broadcast_object(distributed.main_first(_prune, run))
    return full


def _prune(run: RunDir) -> dict:
    """A successful run keeps its newest checkpoint and its final pretrained teacher (distillctl/prune.py)."""
    from distillctl.prune import prune_run

    pruned = prune_run(run.path)
    return run.update_summary({"disk": {"run_bytes": pruned["run_bytes"], "pruned_bytes": pruned["freed_bytes"],
                                        "pruned": pruned["removed"]}})


def _warn_data_faults(train_data: ImageDataset, quiet: bool) -> None:
    faults = train_data.faults
    if quiet or not distributed.info().is_main or not (faults.non_image_files or faults.empty_classes):
        return
    parts = []
    if faults.non_image_files:
        parts.append(f"skipped {len(faults.non_image_files)} non-image files/entries (e.g. {faults.non_image_files[0]})")
    if faults.empty_classes:
        parts.append(f"{len(faults.empty_classes)} empty class folder(s) ignored: {', '.join(faults.empty_classes[:5])}")
    log.warning("data: " + "; ".join(parts))


def _data_faults(train_data: ImageDataset, train_summary: dict) -> dict:
    """Files skipped while scanning (non-images, empty classes) and images that failed to decode."""
    faults = train_data.faults
    return {"unreadable_images": int(train_summary.get("bad_images", 0)),
            "unreadable_list": "bad_images.txt" if train_summary.get("bad_images") else None,
            "non_image_files": len(faults.non_image_files), "non_image_examples": faults.non_image_files[:5],
            "empty_classes": list(faults.empty_classes)}


@dataclass
class CacheStage(Stage):
    """The teacher's outputs on replayable views (cached mode): reused when the cache directory matches."""

    name: ClassVar[str] = "cache"
    recipe: Recipe
    run_dir: RunDir
    teacher: Teacher
    train_data: ImageDataset
    requirements: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: str

    def content(self) -> tuple[Any, ...]:
        spec, views, turns = _cache_views(self.recipe, self.requirements)
        return (self.teacher.sha256, set(self.requirements.teacher_outputs), self.train_data.manifest_hash(), spec,
                views, self.mean, self.std, self.recipe.train.seed, tuple(self.requirements.teacher_taps), turns)

    def fingerprint(self) -> str:
        """The feature cache's own key (also stored in the cache's manifest)."""
        from distillctl.cache.build import cache_fingerprint

        return cache_fingerprint(*self.content())

    def run(self):
        return _cache_stage(self.recipe, self.run_dir, self.teacher, self.train_data, self.requirements, self.mean,
                            self.std, self.device, self.fingerprint())


@dataclass
class DistillStage(Stage):
    """Training the student (and the method's heads) against the teacher, resumable from checkpoints."""

    name: ClassVar[str] = "distill"
    recipe: Recipe
    run_dir: RunDir
    options: RunOptions
    teacher_stage: TeacherStage
    train_data: ImageDataset
    method: Any
    student: torch.nn.Module
    teacher: Teacher | None
    cache: Any
    bags: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str
    teacher_bn: str
    device: str

    def content(self) -> tuple[Any, ...]:
        recipe = self.recipe
        # student.kwargs joins the fingerprint only when set, so runs recorded before it existed still resume
        student = recipe.student.model_dump(exclude=None if recipe.student.kwargs else {"kwargs"})
        train = recipe.train.model_dump(exclude={"log_every", "tensorboard", "checkpoint_every_minutes",
                                                 "checkpoint_every_steps", "keep_last", "device", "threads",
                                                 "max_steps", "resume", "grad_accum"})
        data = recipe.data.model_dump(exclude={"train", "num_workers", "val", "max_bad_fraction",
                                               "decode_cache_mb"})  # train: by hash
        return (*self.teacher_stage.content(), self.train_data.manifest_hash(), student, recipe.method.model_dump(),
                train, data, self.mode, self.teacher_bn, recipe.train.max_steps)

    def run(self) -> dict:
        return _distill_stage(self.recipe, self.run_dir, self.options, self.method, self.student, self.teacher,
                              self.cache, self.train_data, self.mean, self.std, self.mode, self.teacher_bn,
                              self.device, self.fingerprint(), self.bags)


def _cache_views(recipe: Recipe, requirements) -> tuple[Any, int, int]:
    """The view family the cache stores (unrotated), how many views per image, and at how many rotations
    (quarter turns 0..turns-1: the largest the method shows, +1; 1 for methods that do not rotate)."""
    teacher_specs = [view.spec for view in requirements.views if view.teacher]
    # a method that reads only an offline artefact (no teacher view: noroozi-kt, rekd) needs view 0 alone,
    # the centre crop of its first view's size
    spec = teacher_specs[0] if teacher_specs else requirements.views[0].spec
    turns = 1 + max((s.quarter_turns for s in teacher_specs), default=0)
    return (replace(spec, quarter_turns=0), recipe.teacher.cache_views if teacher_specs else 1, turns)


def _cache_stage(recipe, run, teacher, train_data, requirements, mean, std, device, cache_fp: str):
    from distillctl.cache.store import FeatureCache

    spec, cache_views, turns = _cache_views(recipe, requirements)
    outputs = set(requirements.teacher_outputs)
    cache_dir = Path(recipe.teacher.cache) if recipe.teacher.cache else run.path / "cache"
    data_hash = train_data.manifest_hash()
    distributed.barrier()  # every rank looks at the cache directory in the same state
    if (cache_dir / "manifest.json").is_file():
        cache = FeatureCache.open(cache_dir, allow_incomplete=True)
        cache.check_compatible(teacher_sha256=teacher.sha256, outputs=outputs, dataset_hash=data_hash, spec=spec,
                               mean=mean, std=std, taps=requirements.teacher_taps, turns=turns)
        if cache.is_complete():
            # A reused cache is re-hashed before training trusts it (about 1 GB/s): a flipped byte is exit 3.
            cache = FeatureCache.open(cache_dir, verify=True)
            skipped("cache")  # its content matched and verified: reused, not rebuilt
            distributed.main_first(run.record_stage, "cache", cache_fp, "done", {"path": str(cache_dir), "views": cache.views})
            return cache
    cache = build_cache_guarded(teacher, train_data, cache_dir, spec=spec, views=cache_views,
                                outputs=outputs, taps=requirements.teacher_taps, turns=turns, mean=mean, std=std,
                                batch_size=recipe.eval.batch_size, device=device,
                                amp=recipe.train.amp, channels_last=recipe.train.channels_last, seed=recipe.train.seed,
                                num_workers=recipe.data.num_workers, on_batch=_cache_kill_hook(),
                                max_bad_fraction=recipe.data.max_bad_fraction)
    distributed.main_first(run.record_stage, "cache", cache_fp, "done", {"path": str(cache_dir), "views": cache.views})
    return cache


def build_cache_guarded(teacher, dataset, cache_dir, **kwargs):
    """``build_cache`` with a full disk (or any write failure) reported as one line; the sealed shards
    stay valid and the next run resumes the build from them."""
    from distillctl.cache.build import build_cache
    from distillctl.errors import TrainingError

    try:
        return build_cache(teacher, dataset, cache_dir, **kwargs)
    except OSError as exc:
        raise TrainingError(f"writing the feature cache in {cache_dir} failed: {exc.strerror or exc}; "
                            "the shards sealed so far are intact",
                            hint="free disk space (or pass --cache on another disk), then rerun: the build resumes") from exc


def _cache_kill_hook():
    """Test hook (DISTILLCTL_TEST_KILL_IN_CACHE_BATCH=N): die like kill -9 after the N-th cache batch."""
    from distillctl.train.faults import KILL_IN_CACHE_BATCH_ENV, env_step

    kill_after = env_step(KILL_IN_CACHE_BATCH_ENV)
    if not kill_after:
        return None
    batches = [0]

    def hook(info) -> None:  # noqa: ANN001
        import os

        batches[0] += 1
        if batches[0] >= kill_after:
            os._exit(137)

    return hook


def _neighbour_bags(recipe, method, requirements, teacher, cache, train_data, mean, std, device):
    """BINGO stage 0: each image's k nearest neighbours under the teacher's centre-crop embedding — from the
    cache's view 0 (computed in blocks, stored beside the cache) or from one online pass of the teacher."""
    if not any(getattr(view, "source", "self") == "neighbour" for view in requirements.views):
        return None
    k = int(getattr(method.params, "bag_size", 5))
    if cache is not None:
        from distillctl.cache.artifacts import knn_bags

        output = "pooled" if "pooled" in cache.outputs else next(iter(cache.outputs))
        bags = distributed.main_first(knn_bags, cache, k=k, output=output)  # rank 0 computes and stores them
        if bags is None:  # other ranks read what rank 0 stored beside the cache
            bags = knn_bags(cache, k=k, output=output)
        return torch.from_numpy(bags)
    from distillctl.eval.features import embed_dataset
    from distillctl.methods.shared import knn_bags as feature_bags

    bad = BadImages("bags", len(train_data), recipe.data.max_bad_fraction)
    features, _ = embed_dataset(teacher.backbone.eval(), train_data, input_size=recipe.data.image_size, mean=mean,
                                std=std, crop_pct=recipe.data.crop_pct, batch_size=recipe.eval.batch_size, device=device,
                                bad_images=bad, substitute=True)  # row i must stay image i's: the bags index by image
    bad.finish("substituted")
    return feature_bags(features, k)


def _resume_required(recipe: Recipe, options: RunOptions) -> bool:
    return options.resume or recipe.train.resume == "required"


def training_checkpoint_dirs(run: RunDir) -> list[Path]:
    """Where the run's training stages checkpoint: each ``pretrain`` teacher's run, then the run's own training."""
    return sorted(run.path.glob("teacher_pretrain*/distill/checkpoints")) + [run.path / "distill" / "checkpoints"]


def _check_resumable(recipe: Recipe, run: RunDir, options: RunOptions) -> None:
    """``--resume`` needs a checkpoint in some training stage of the run (the teacher's pretraining or the
    distillation): whichever was interrupted continues; the stages before it are skipped, those after it start."""
    if not _resume_required(recipe, options) or options.restart:
        return
    from distillctl.train.checkpoint import CheckpointManager

    found = any(CheckpointManager(directory).list() for directory in training_checkpoint_dirs(run) if directory.is_dir())
    if not distributed.broadcast_object(found):
        raise UsageError(f"--resume: no checkpoint to resume from in {run.path} (teacher pretraining or distillation)",
                         hint="drop --resume to start the run")


def _teacher_artifact(recipe, run, method, requirements, teacher, cache, train_data, mean, std, device) -> None:
    """Hand a method its offline teacher artefact (noroozi-kt's k-means labels, rekd's relations; see
    ``methods/shared.TeacherArtifact``), computed once from the feature cache's centre-crop view 0 and stored
    beside the cache (``cache/artifacts.py``; reused when it matches). Every image's embedding is needed before
    step 0, so an online run first builds the cache's one centre-crop view (one teacher pass) as well."""
    wanted = method.teacher_artifact() if hasattr(method, "teacher_artifact") else None
    if wanted is None:
        return
    if cache is None:
        cache = CacheStage(recipe, run, teacher, train_data, requirements, mean, std, device).run()
    from distillctl.cache.artifacts import kmeans_labels, knn_bags

    images = cache.num_images
    if (wanted.kind == "kmeans" and wanted.size > images) or (wanted.kind == "knn" and wanted.size >= images):
        key = "clusters" if wanted.kind == "kmeans" else "knn_k"
        raise UsageError(f"method.params.{key}={wanted.size} for {method.name} needs more training images than the "
                         f"{images} there are", hint=f"set method.params.{key} well below {images}")

    def compute():
        if wanted.kind == "kmeans":
            return kmeans_labels(cache, wanted.size, wanted.iters, wanted.seed, output=wanted.output, device=device)
        return knn_bags(cache, k=wanted.size, output=wanted.output, device=device)

    table = distributed.main_first(compute)  # rank 0 computes and stores it; the other ranks read it back
    method.use_artifact(torch.from_numpy(table if table is not None else compute()))


def _set_aside_metrics(path: Path) -> None:
    """``--restart``: the old run's metrics move to ``metrics.jsonl.prev`` so the file describes one training."""
    if path.is_file():
        path.replace(path.with_name(path.name + ".prev"))


def _distill_stage(recipe, run, options, method, student, teacher, cache, train_data, mean, std, mode, teacher_bn,
                   device, distill_fp, bags=None) -> dict:
    from distillctl.train.checkpoint import CheckpointManager
    from distillctl.train.loop import TrainJob, train

    checkpoints = CheckpointManager(run.path / "distill" / "checkpoints", recipe.train.keep_last)
    if options.restart:
        distributed.main_first(checkpoints.clear)
        distributed.main_first(_set_aside_metrics, run.metrics_path)
    elif run.stage_done("distill", distill_fp) and (run.student_dir / "model.safetensors").is_file():
        if not options.quiet:
            skipped("distill")
        return run.stage("distill")["result"]
    # --resume continues whichever training stage was interrupted: this one if it was (recorded "running", or
    # checkpoints left in it); when the teacher's pretraining was, this stage simply starts
    interrupted = (run.stage("distill") or {}).get("status") == "running" or bool(checkpoints.list())
    require = _resume_required(recipe, options) and distributed.broadcast_object(interrupted)
    if require and not distributed.broadcast_object(bool(checkpoints.list())):
        raise UsageError(f"--resume: no checkpoint to resume from in {checkpoints.directory}")
    distributed.main_first(run.record_stage, "distill", distill_fp, "running")
    job = TrainJob(
        method=method, student=student, dataset=train_data, train=recipe.train, data=recipe.data,
        out_dir=run.path / "distill", metrics_path=run.metrics_path, fingerprint=distill_fp, mean=mean, std=std,
        device=device, teacher=teacher if mode in ("online", "co_trained") else None, teacher_bn=teacher_bn,
        cache=cache, bags=bags, resume=not options.restart, require_resume=require,
        stage="pretrain" if teacher is None and method.kind == "ssl" else "distill",
        tensorboard_dir=run.path / "tensorboard" if recipe.train.tensorboard else None,
    )
    result = train(job)
    student.cpu()
    method.cpu()
    summary = {**result.to_dict(), "teacher_mode": mode, "teacher_bn": teacher_bn,
               "lr": job.lr, "base_lr": recipe.train.lr, "lr_scaling": recipe.train.lr_scaling,
               "lr_rule": ("lr = base_lr x global_batch / 256" if recipe.train.lr_scaling == "linear"
                           else "lr = base_lr (global batch fixed by the recipe, independent of world size)"),
               "global_batch": recipe.train.batch_size,
               "per_process_batch": recipe.train.batch_size // result.world_size,
               "micro_batch": recipe.train.batch_size // result.world_size // recipe.train.grad_accum}

    def write() -> None:
        _write_student(run, student, method, recipe, teacher, mean, std)
        if mode == "co_trained":
            _write_cotrained_teacher(run, teacher)
        if bad:
            bad.write(run.path / "bad_images.txt")
        run.record_stage("distill", distill_fp, "done", summary)

    bad = BadImages("train", len(train_data), recipe.data.max_bad_fraction,
                    dict(line.split(": ", 1) for line in result.bad_images))
    distributed.main_first(write)
    if distributed.info().is_main:
        bad.report("substituted", run.path / "bad_images.txt")
    return summary


def dumps(summary: dict) -> str:
    return json.dumps(summary, indent=2, sort_keys=True, default=str)
