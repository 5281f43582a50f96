"""The stages of ``distillctl run`` as objects, and the evaluation and export steps.

A stage (:class:`Stage`) has typed inputs (its dataclass fields), a fingerprint over their *content* (hashes of
the teacher, data and student, settings; never a path, so a moved run directory still matches) and a run step.
``pipeline.run_pipeline`` builds them in order (teacher → cache → distill → eval → export), runs each and
records it in the run manifest; a stage whose fingerprint is recorded as done is skipped.

Evaluation under torchrun: each rank embeds a contiguous slice of the train (bank) and eval (query)
splits, the slices are gathered in rank order on every rank, and rank 0 alone scores kNN, runs the
linear probe and records the result (broadcast to the others). Export runs on rank 0 only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from distillctl._infra import get_logger
from distillctl.data.datasets import ImageDataset
from distillctl.rundir import RunDir, content_identity, fingerprint
from distillctl.students import create_backbone
from distillctl.train import distributed

if TYPE_CHECKING:
    from distillctl.config import Recipe


log = get_logger(__name__)


class Stage(ABC):
    """One step of ``distillctl run``: typed inputs (the dataclass fields), a content fingerprint, a run step."""

    name: ClassVar[str]

    @abstractmethod
    def content(self) -> tuple[Any, ...]:
        """What the stage's result depends on, as content: hashes and settings, never paths."""

    def fingerprint(self) -> str:
        return fingerprint(*self.content())

    @abstractmethod
    def run(self) -> Any:
        """Do the work (or skip it when the manifest records this fingerprint as done) and record it."""


def skipped(stage: str) -> None:
    """Say that a stage was skipped (main process only)."""
    if distributed.info().is_main:
        log.info(f"{stage}: finished earlier with the same inputs; skipped")


@dataclass
class TeacherStage(Stage):
    """The frozen teacher, identified by its content (sha256, architecture, dimensions), not its location."""

    name: ClassVar[str] = "teacher"
    run_dir: RunDir
    described: dict | None  # Teacher.describe() (None: no teacher)

    def content(self) -> tuple[Any, ...]:
        return (content_identity(self.described),)

    def run(self) -> dict | None:
        distributed.main_first(self.run_dir.record_stage, self.name, self.fingerprint(), "done", self.described)
        return self.described


@dataclass
class EvalStage(Stage):
    """kNN (and optionally linear) evaluation of student, teacher and a random-init student."""

    name: ClassVar[str] = "eval"
    recipe: Any
    run_dir: RunDir
    teacher: Any
    train_data: ImageDataset
    val_data: ImageDataset | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: str
    student_sha: str
    # the identity of the teacher's weights when they differ from its file (a co-trained teacher:
    # student/teacher_cotrained.safetensors); None: the teacher's own sha256
    teacher_sha: str | None = None

    def content(self) -> tuple[Any, ...]:
        teacher_sha = self.teacher_sha or (self.teacher.sha256 if self.teacher else None)
        return (self.student_sha, teacher_sha, self.recipe.eval.model_dump(),
                self.train_data.manifest_hash(), self.val_data.manifest_hash() if self.val_data else None,
                self.mean, self.std)

    def run(self) -> dict:
        return _eval_stage(self.recipe, self.run_dir, self.teacher, self.train_data, self.val_data, self.mean,
                           self.std, self.device, self.student_sha, self.fingerprint())


@dataclass
class ExportStage(Stage):
    """ONNX (and derived formats) behind the parity and accuracy gates."""

    name: ClassVar[str] = "export"
    recipe: Any
    run_dir: RunDir
    student_sha: str

    def content(self) -> tuple[Any, ...]:
        export = self.recipe.export.model_dump()
        if export.get("calib_data"):  # the calibration images by content, not by where they are
            from distillctl.data.datasets import open_dataset

            export["calib_data"] = "sha256:" + open_dataset(export["calib_data"], "train").manifest_hash()
        return (self.student_sha, export)

    def run(self) -> dict:
        return _export_stage(self.recipe, self.run_dir, self.student_sha, self.fingerprint())


def _eval_stage(recipe, run, teacher, train_data, val_data, mean, std, device, student_sha, eval_fp: str) -> dict:
    """kNN (and linear probe) of the student, the teacher and a random student."""
    if run.stage_done("eval", eval_fp):
        skipped("eval")
        return run.stage("eval")["result"]
    if val_data is None:
        result = {"skipped": "no labelled eval split (pass --val-data or use a train/ + val/ layout)"}
        distributed.main_first(run.record_stage, "eval", eval_fp, "done", result)
        return result
    from distillctl.data.bad_images import BadImages
    from distillctl.eval.features import embed_dataset
    from distillctl.eval.knn import knn_evaluate
    from distillctl.students import load_student

    ks = tuple(recipe.eval.knn_k)
    protocol = {"kind": "weighted-knn", "k": list(ks), "temperature": recipe.eval.knn_temperature,
                "metric": "cosine", "bank": "train split", "transform": "centre crop",
                "crop_pct": recipe.data.crop_pct, "image_size": recipe.data.image_size, "bn": "eval"}

    embeddings: dict[str, tuple] = {}  # the student's, kept for the linear probe (embedded once)
    # unreadable images are skipped in the bank and the queries (every encoder meets the same files)
    bad = BadImages("eval", len(train_data) + len(val_data), recipe.data.max_bad_fraction)

    def knn_of(encoder, name: str) -> dict:
        kwargs = dict(input_size=recipe.data.image_size, mean=mean, std=std, crop_pct=recipe.data.crop_pct,
                      batch_size=recipe.eval.batch_size, device=device, bad_images=bad)
        bank, bank_labels = _embed_sharded(embed_dataset, encoder, train_data,
                                           {**kwargs, **_meter(f"eval: {name}", "bank", train_data)})
        queries, query_labels = _embed_sharded(embed_dataset, encoder, val_data,
                                               {**kwargs, **_meter(f"eval: {name}", "queries", val_data)})
        if not distributed.info().is_main:
            return {}
        embeddings[name] = (bank, bank_labels, queries, query_labels)
        scores = knn_evaluate(bank, bank_labels, queries, query_labels, ks=ks, temperature=recipe.eval.knn_temperature)
        return {"knn": {str(k): round(v, 3) for k, v in scores.items()}, "knn_top1": round(scores[ks[0]], 3)}

    student, _ = load_student(run.path)
    result = {"protocol": protocol, "student": knn_of(student.to(device), "student")}
    merged = bad.gathered()  # every rank sees the same list: all stop together above the limit, or none
    merged.check()
    if merged and distributed.info().is_main:
        result.update(merged.finish("skipped", run.path / "bad_images_eval.txt"))
    if teacher is not None and recipe.eval.teacher:
        result["teacher"] = knn_of(teacher.backbone.to(device).eval(), "teacher")
    if recipe.eval.random_student:
        torch.manual_seed(recipe.train.seed)  # the random-init baseline is reproducible
        random_student = create_backbone(recipe.student.arch, img_size=recipe.data.image_size,
                                         model_kwargs=_random_student_kwargs(recipe))
        result["random_student"] = knn_of(random_student.eval().to(device), "random_student")
    if not distributed.info().is_main:  # the linear probe and the manifest are rank 0's
        return distributed.broadcast_object(None)
    if recipe.eval.linear:
        from dataclasses import replace

        from distillctl.eval.features import eval_transform
        from distillctl.eval.linear import LinearProbeConfig, linear_probe_embeddings

        # the same embeddings kNN used: the probe does not embed the splits a second time
        probe = linear_probe_embeddings(*embeddings["student"], replace(LinearProbeConfig(), seed=recipe.train.seed),
                                        num_classes=len(train_data.classes), device=device)
        probe.protocol["transform"] = eval_transform(recipe.data.image_size, mean, std, recipe.data.crop_pct)
        result["student"]["linear"] = probe.to_dict()
    run.record_stage("eval", eval_fp, "done", result)
    return distributed.broadcast_object(result)


def _meter(label: str, split: str, dataset) -> dict:
    """``progress=`` for embed_dataset: a line when embedding starts and one every few seconds (rank 0)."""
    from distillctl.cache.progress import BuildProgress
    from distillctl._infra import phase

    main = distributed.info().is_main
    if main:
        phase(f"{label}: embedding the {split} ({len(dataset):,} images)")
    meter = BuildProgress(len(dataset), 0, enabled=main, label=f"{label} {split}", plain_every_s=15.0)
    return {"progress": meter.advance}


def _embed_sharded(embed_dataset, encoder, dataset: ImageDataset, kwargs: dict):
    """Each rank embeds a contiguous slice of ``dataset``; rank order concatenation = the full dataset."""
    info = distributed.info()
    if info.world_size == 1:
        return embed_dataset(encoder, dataset, **kwargs)
    import numpy as np

    rows = np.array_split(np.arange(len(dataset)), info.world_size)[info.rank]
    embeddings, labels = embed_dataset(encoder, dataset.subset(rows), **kwargs)
    return distributed.all_gather_uneven(embeddings), distributed.all_gather_uneven(labels)


def _export_stage(recipe, run, student_sha, export_fp: str) -> dict:
    if not recipe.export.enabled or not recipe.export.formats:
        return {}
    if distributed.is_distributed():  # exporting is rank 0's; the others wait for its result (or its error)
        return distributed.broadcast_object(distributed.main_first(_export_stage_main, recipe, run, student_sha, export_fp))
    return _export_stage_main(recipe, run, student_sha, export_fp)


def _export_stage_main(recipe, run, student_sha, export_fp: str) -> dict:
    if run.stage_done("export", export_fp):
        skipped("export")
        return run.stage("export")["result"]
    from distillctl.errors import GateError
    from distillctl.export.api import export_run

    try:
        result = export_run(run.path, recipe.export, max_bad_fraction=recipe.data.max_bad_fraction)
    except GateError:
        run.record_stage("export", export_fp, "failed", run.summary().get("export", {}))
        raise
    run.record_stage("export", export_fp, "done", result)
    return result


def _random_student_kwargs(recipe: Recipe) -> dict:
    """The trained student's constructor keywords (student.kwargs, img_size), for its random-init twin."""
    from distillctl.resolution import student_model_kwargs
    from distillctl.students import resolve_arch

    return student_model_kwargs(resolve_arch(recipe.student.arch), recipe.data.image_size, (), recipe.student.kwargs)
