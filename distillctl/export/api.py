"""``export_run``: the export stage of a run — ONNX (+ fp16, INT8, TensorRT), gated and carded.

Order: fp32 ONNX → fp32 parity gate → the other formats, each with its own gate → model card
(embedded in every ONNX, and ``export/model_card.json`` last) → ``summary.json['export']``.
Gates are evaluated as the artefacts are made but raised only after the report is written, so a
failed export still leaves the numbers that explain the failure. If the fp32 graph fails parity,
nothing is derived from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distillctl._infra import phase
from distillctl.errors import GateError, InputError, UsageError
from distillctl.export import card as card_module
from distillctl.export.onnx import (BATCH_DIM, DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, default_opset,
                                    export_onnx, set_metadata)
from distillctl.export.parity import INT8_FLOOR_SOURCE, ParityResult, check_parity, ort_runner
from distillctl.export.quantize import (CALIBRATION_METHODS, CPU_FORMS, check_tensorrt_compatible, convert_fp16,
                                        default_cpu_form)

if TYPE_CHECKING:
    from distillctl.config import ExportConfig

EXPORT_FORMATS = ("onnx", "onnx-fp16", "onnx-int8", "openvino", "openvino-int8", "engine", "engine-int8")
INT8_FORMATS = ("onnx-int8", "engine-int8", "openvino-int8")
FILES = {"onnx": "student.onnx", "onnx-fp16": "student.fp16.onnx", "onnx-int8": "student.int8.onnx",
         "openvino": "student.openvino.xml", "openvino-int8": "student.int8.openvino.xml",
         "onnx-int8-trt": "student.int8.trt.onnx"}


def parse_formats(formats: list[str] | str) -> list[str]:
    """Validate and order the requested formats (comma-separated strings accepted)."""
    if isinstance(formats, str):
        formats = [formats]
    names = [name.strip() for item in formats for name in item.split(",") if name.strip()]
    unknown = [name for name in names if name not in EXPORT_FORMATS]
    if unknown or not names:
        raise UsageError(f"unknown export format(s) {', '.join(unknown) or '(none)'}; valid: {', '.join(EXPORT_FORMATS)}")
    return [name for name in EXPORT_FORMATS if name in names]


def export_config(formats: list[str] | str | None = None, **options: Any) -> ExportConfig:
    """The recipe's ``export`` section from loose values (CLI flags, API keywords), checked with one-line errors.

    ``options`` are :class:`distillctl.config.ExportConfig`'s fields (``calib_size``, ``calib_method``, ``max_drop``,
    ``parity_images``, ``int8_form``, ``slim``, …); an unknown one is a usage error (exit 2)."""
    from distillctl.config import ExportConfig
    from distillctl.export.onnx import EXPORTERS

    unknown = sorted(set(options) - set(ExportConfig.model_fields))
    if unknown:
        raise UsageError(f"unknown export option(s) {', '.join(unknown)}; valid: {', '.join(ExportConfig.model_fields)}")
    calib_method = options.get("calib_method", "auto")
    if calib_method not in CALIBRATION_METHODS + ("auto",):
        raise UsageError(f"unknown calibration method '{calib_method}'; valid: auto, {', '.join(CALIBRATION_METHODS)}")
    if options.get("exporter", "dynamo") not in EXPORTERS:
        raise UsageError(f"unknown exporter '{options['exporter']}'; valid: {', '.join(EXPORTERS)}")
    if options.get("int8_form", "auto") not in CPU_FORMS + ("auto",):
        raise UsageError(f"unknown INT8 form '{options['int8_form']}'; valid: auto, {', '.join(CPU_FORMS)}")
    if options.get("calib_size", 1) < 1 or options.get("parity_images", 4) < 1:
        raise UsageError("--calib-size and the number of parity images must be >= 1")
    from pydantic import ValidationError

    from distillctl.config import format_validation_error

    try:
        return ExportConfig(formats=parse_formats(formats or ["onnx"]), **options)
    except ValidationError as exc:
        raise format_validation_error(exc, ExportConfig, prefix="export") from exc


def export_run(
    run_dir: str | Path,
    section: ExportConfig,
    *,
    data: str | None = None,
    val_data: str | None = None,
    max_bad_fraction: float = 0.01,  # data.max_bad_fraction: unreadable calibration/parity images allowed
    crop_pct: float | None = None,
) -> dict[str, Any]:
    """Export the student of ``run_dir`` to ``<run>/export`` as the recipe's ``export`` section says; return the
    per-format report.

    ``data``/``val_data``/``crop_pct`` override the labelled splits recorded in the run. ``section.int8_form``
    is the layout of ``student.int8.onnx`` (``auto``: the fast one for ONNX Runtime on this CPU, see
    :func:`distillctl.export.quantize.default_cpu_form`); ``section.slim`` cleans the fp32 graph with onnxslim
    before anything is derived from it, kept only if it passes the fp32 parity gate. Loose values (CLI flags,
    API keywords) become a section through :func:`export_config`.
    Raises :class:`GateError` (exit 3) after writing the report if any gate failed. Holds the run directory's lock
    (:mod:`distillctl.runlock`; exit 2 while another process writes into the run).

    Transactional: the artefacts and the model card are built in a stage beside ``<run>/export`` and swapped in
    with the summary's report once all of them are written (:class:`distillctl.export._fs.StagedDirectory`). A
    failure before that (a conversion error, a full disk, Ctrl-C) leaves the previous ``export/`` and summary.json
    exactly as they were. A failed gate is a finished export: its artefacts, card and numbers are committed, then
    exit 3 (``summary.json['export']`` always describes the files in ``export/``).
    """
    from distillctl.export._fs import StagedDirectory
    from distillctl.runlock import hold
    from distillctl.students import require_student_files

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run directory does not exist: {run_dir}")
    require_student_files(run_dir)  # before the lock, whose file would otherwise be left in a folder that is not a run
    with hold(run_dir, create=False):
        stage = StagedDirectory(run_dir / "export")
        try:
            return _export_run(run_dir, stage, section, data=data, val_data=val_data,
                               max_bad_fraction=max_bad_fraction, crop_pct=crop_pct)
        finally:
            stage.abort()  # nothing left of the stage, committed or not


def _export_run(run_dir: Path, stage, section: ExportConfig, *, data: str | None, val_data: str | None,
                max_bad_fraction: float, crop_pct: float | None) -> dict[str, Any]:
    """:func:`export_run` under the run directory's lock, building into ``stage`` (paths in the report are
    relative to ``stage.root``, which holds the new ``export/`` as the run directory will)."""
    from distillctl.students import count_parameters, load_student

    formats = parse_formats(section.formats)
    calib_data, calib_size, calib_method = section.calib_data, section.calib_size, section.calib_method
    max_drop, half, exporter, parity_images = section.max_drop, section.half, section.exporter, section.parity_images
    slim = section.slim
    int8_form = default_cpu_form() if section.int8_form == "auto" else section.int8_form
    if any(name.startswith("openvino") for name in formats):  # fail fast (exit 2) before minutes of export work
        from distillctl.export.openvino import require_openvino

        require_openvino()
    if slim:  # fail fast (exit 2) before minutes of export work
        from distillctl.export.onnx import require_onnxslim

        require_onnxslim()
    engine_precision = {"engine": "fp16" if half else "fp32", "engine-int8": "int8"}
    if half and not any(name.startswith("engine") for name in formats):
        raise UsageError("--half applies to --format engine", hint="for an fp16 ONNX file use --format onnx-fp16")
    engines_wanted = [name for name in formats if name.startswith("engine")]
    major = 0
    if engines_wanted:  # fail fast (exit 2) before minutes of export work
        from distillctl.export.tensorrt import require_tensorrt, trt_major

        major = trt_major(require_tensorrt())

    model, config = load_student(run_dir, exportable=True)
    size = int(config.input_size[-1])
    splits = _labelled_splits(run_dir, data, val_data, crop_pct)
    parity_set = _eval_images(splits.test, _spread(len(splits.test), parity_images), size, config, splits.crop_pct,
                              max_bad_fraction)
    export_dir, staged_run = stage.path, stage.root  # the new export/ and the folder it sits in until the commit
    _carry_timing_caches(run_dir / "export", export_dir)

    report: dict[str, Any] = {}
    failures: list[GateError] = []
    quantization: dict[str, Any] = {}
    engines: dict[str, Any] = {}

    def gate(result: ParityResult | Any, what: str) -> None:
        try:
            result.raise_if_failed(what) if isinstance(result, ParityResult) else result.raise_if_failed()
        except GateError as exc:
            failures.append(exc)

    phase(f"export: ONNX fp32 ({exporter} exporter) of {config.arch}")
    onnx_path = export_onnx(model, export_dir / FILES["onnx"], size, exporter=exporter,
                           metadata=card_module.card_to_metadata({"input": _input_spec(config, splits.crop_pct)}))
    slim_report = _slim(model, onnx_path, parity_set, exporter) if slim else None
    phase(f"export: parity of student.onnx against PyTorch on {len(parity_set)} held-out images")
    fp32 = check_parity(model, ort_runner(onnx_path), parity_set, precision="fp32")
    report["onnx"] = {"path": _rel(onnx_path, staged_run), "opset": default_opset(onnx_path), "exporter": exporter,
                      "parity": fp32.to_dict()}
    if slim_report is not None:
        report["onnx"]["slim"] = slim_report
    gate(fp32, "student.onnx")

    if fp32.passed:
        if "onnx-fp16" in formats or ("engine" in formats and half and major >= 11):
            phase("export: fp16 ONNX and its parity")
            fp16_path = convert_fp16(onnx_path, export_dir / FILES["onnx-fp16"])
            fp16 = check_parity(model, ort_runner(fp16_path), parity_set, precision="fp16")
            report["onnx-fp16"] = {"path": _rel(fp16_path, staged_run), "parity": fp16.to_dict()}
            gate(fp16, fp16_path.name)
        calibration = _Calibration(splits, config, calib_data, calib_size, max_bad_fraction) \
            if any(name in formats for name in INT8_FORMATS) else None
        accuracy_of = _accuracy_judge(onnx_path, splits, config, max_drop)
        if "onnx-int8" in formats or "engine-int8" in formats:
            report["onnx-int8"], quantization = _int8(model, onnx_path, export_dir, staged_run, calibration, parity_set,
                                                      calib_method, int8_form, accuracy_of, gate)
        if any(name.startswith("openvino") for name in formats):
            openvino_quantization = _openvino(model, onnx_path, export_dir, staged_run, formats, calibration, parity_set,
                                              accuracy_of, gate, report)
            if openvino_quantization:
                quantization = {**quantization, "openvino": openvino_quantization}
        for name in engines_wanted:
            engines[name], report[name] = _engine(model, export_dir, staged_run, size, engine_precision[name], config,
                                                  parity_set, gate)
    else:
        for name in formats:
            if name != "onnx":
                report[name] = {"skipped": "the fp32 ONNX failed its parity gate"}

    report["passed"] = not failures
    phase("export: model card and metadata")
    card = card_module.build_model_card(
        student={"arch": config.arch, "num_features": config.num_features, "params": count_parameters(model)},
        teacher=dict(config.teacher or {}), method=config.method, license=config.license,
        input_spec=_input_spec(config, splits.crop_pct),
        output_spec={"name": OUTPUT_NAME, "dim": config.num_features, "l2_normalized": False,
                     "dynamic_dims": {"0": BATCH_DIM}},
        data=splits.describe(),
        export={"exporter": exporter, "opset": DEFAULT_OPSET[exporter], "formats": formats},
        evaluation=_eval_section(run_dir, report),
        parity={name: entry["parity"] for name, entry in _flat_entries(report) if "parity" in entry},
        quantization=quantization or None, engines=engines or None,
        created=card_module.created_stamp(run_dir / "student" / "model.safetensors"),
    )
    artefacts = [staged_run / entry["path"] for _, entry in _flat_entries(report) if "path" in entry]
    artefacts += [path.with_suffix(".bin") for path in artefacts if path.suffix == ".xml"]
    props = card_module.card_to_metadata(card)
    for name, entry in _flat_entries(report):
        artefact = staged_run / entry.get("path", "")
        own = props | card_module.artifact_metadata(name, artefact.name, entry.get("quantization"))
        if "path" in entry and artefact.suffix == ".onnx":
            set_metadata(artefact, own)
        elif "path" in entry and artefact.suffix == ".xml":
            from distillctl.export.openvino import set_ir_metadata

            set_ir_metadata(artefact, own)
    card_path = card_module.write_model_card(export_dir / "model_card.json", card, artefacts)
    report["model_card"] = _rel(card_path, staged_run)
    _read_summary(run_dir, strict=True)  # an unreadable summary.json refuses the export before anything is swapped
    phase("export: swapping the new export/ in")
    stage.commit(then=lambda: _merge_summary(run_dir, report))
    if failures:
        message = failures[0].message if len(failures) == 1 else \
            f"{len(failures)} export gates failed: " + " | ".join(f.message for f in failures)
        raise GateError(message, hint=failures[0].hint)
    return report


def _carry_timing_caches(previous: Path, export_dir: Path) -> None:
    """TensorRT timing caches (``trt.*.timing.cache``) of the previous export seed the new one: they only speed up
    engine builds (TensorRT checks their GPU and version), the artefacts themselves are all rebuilt."""
    import shutil

    for cache in sorted(previous.glob("trt.*.timing.cache")) if previous.is_dir() else []:
        shutil.copy2(cache, export_dir / cache.name)


class _Calibration:
    """The INT8 calibration images (eval transform), shared by every INT8 artefact, and how they were drawn."""

    def __init__(self, splits, config, calib_data: str | None, calib_size: int, max_bad_fraction: float) -> None:
        from distillctl.data.datasets import open_dataset

        dataset = open_dataset(calib_data, "train") if calib_data else splits.train
        self.indices = np.sort(np.random.default_rng(0).permutation(len(dataset))[:calib_size])
        phase(f"export: INT8 calibration images ({len(self.indices)}, eval transform)")
        self.images = _eval_images(dataset, self.indices, int(config.input_size[-1]), config, splits.crop_pct,
                                   max_bad_fraction).numpy()
        self.describe = {"data": calib_data or splits.train_spec, "images": int(len(self.indices)),
                         "data_manifest_sha256": dataset.manifest_hash(),
                         "indices_sha256": hashlib.sha256(self.indices.astype(np.int64).tobytes()).hexdigest(),
                         "transform": "eval (centre crop)"}


def _accuracy_judge(onnx_path: Path, splits, config, max_drop: float):
    """``accuracy_of(path)``: kNN report of an artefact (ONNX or OpenVINO IR) vs the fp32 ONNX, fp32 computed once."""
    from distillctl.export.accuracy import compare_knn

    knn_args = dict(input_size=int(config.input_size[-1]), mean=list(config.mean), std=list(config.std),
                    crop_pct=splits.crop_pct, max_drop=max_drop)
    reference: dict[str, float] = {}

    def accuracy_of(path):
        phase(f"export: kNN accuracy of {Path(path).name} vs fp32 ({len(splits.train):,} + {len(splits.test):,} "
              "images)")
        report = compare_knn(onnx_path, path, splits.train, splits.test, reference_top1=reference.get("top1"),
                             **knn_args)
        reference["top1"] = report.reference_top1
        return report

    return accuracy_of


def _int8(model, onnx_path, export_dir, run_dir, calibration, parity_set, calib_method, int8_form, accuracy_of,
          gate) -> tuple[dict, dict]:
    """Both INT8 artefacts (the CPU form and the TensorRT form), their parity and kNN accuracy reports.

    Calibration runs once per method (shared by both forms); the method and the layers left in float
    are chosen per artefact by :func:`distillctl.export.int8.select_int8`, because the two forms round
    differently (uint8 asymmetric vs symmetric int8 activations).
    """
    from distillctl.export.int8 import select_int8
    from distillctl.export.quantize import FORMS, Int8Quantizer

    calib = calibration.images
    methods = CALIBRATION_METHODS if calib_method == "auto" else (calib_method,)
    entries: dict[str, dict] = {}
    selections: dict[str, dict] = {}
    with Int8Quantizer(onnx_path, calib, workdir=export_dir) as quantizer:
        for key, form in (("onnx-int8", int8_form), ("onnx-int8-trt", "tensorrt")):
            phase(f"export: INT8 {form} ({', '.join(methods)} calibration), parity per try")
            chosen, tried = select_int8(quantizer, model, parity_set, export_dir, methods=methods, form=form,
                                        accuracy_of=accuracy_of)
            os.replace(chosen.info.path, export_dir / FILES[key])
            info = chosen.info
            info.path = str(export_dir / FILES[key])
            chosen.accuracy.candidate = FILES[key]  # it was measured under its try name
            gate(chosen.parity, FILES[key])
            gate(chosen.accuracy, None)
            entry = {"path": _rel(Path(info.path), run_dir), "form": info.form, "parity": chosen.parity.to_dict(),
                     "accuracy": chosen.accuracy.to_dict(),
                     "quantization": info.to_dict() | {"path": _rel(Path(info.path), run_dir)}}
            if form == "tensorrt":
                check_tensorrt_compatible(info.path)  # Int8Quantizer checked already; cheap, and explicit here
                entry["tensorrt_compatible"] = True
            entries[key] = entry
            selections[FILES[key]] = {"method": chosen.method, "excluded_nodes": chosen.exclude, "tried": tried,
                                      "sensitivity": chosen.sensitivity}
    described = {**calibration.describe, "requested": calib_method, "method": selections[FILES["onnx-int8"]]["method"],
                 "selection": selections, "decided_by": "kNN accuracy budget (--max-drop), then the INT8 cosine floor",
                 "cosine_floor_source": INT8_FLOOR_SOURCE, "per_channel": True}
    result = entries["onnx-int8"] | {"tensorrt_variant": entries["onnx-int8-trt"]}
    forms = {FILES[key]: FORMS[entries[key]["form"]].to_dict() for key in entries}
    return result, {"calibration": described, "forms": forms,
                    FILES["onnx-int8"]: entries["onnx-int8"]["quantization"],
                    FILES["onnx-int8-trt"]: entries["onnx-int8-trt"]["quantization"]}


def _openvino(model, onnx_path, export_dir, run_dir, formats, calibration, parity_set, accuracy_of, gate,
              report) -> dict | None:
    """``openvino`` (fp32 IR) and ``openvino-int8`` (NNCF) into ``report``; returns the INT8 card section."""
    from distillctl.export.openvino import (OPENVINO_PRESETS, convert_ir, ov_runner, quantize_ir, remove_ir,
                                           runtime_description)

    phase("export: OpenVINO fp32 IR and its parity")
    xml = convert_ir(onnx_path, export_dir / FILES["openvino"])
    parity = check_parity(model, ov_runner(xml), parity_set, precision="fp32")
    gate(parity, xml.name)
    if "openvino" in formats:
        report["openvino"] = {"path": _rel(xml, run_dir), "parity": parity.to_dict(),
                              "runtime": runtime_description(xml)}
    if "openvino-int8" not in formats:
        return None
    tried, best = [], None
    for preset in OPENVINO_PRESETS:
        phase(f"export: OpenVINO INT8 (NNCF, {preset}) on {len(calibration.images)} calibration images")
        info = quantize_ir(xml, export_dir / f".int8-try-{preset}.openvino.xml", calibration.images, preset=preset)
        candidate = {"info": info, "parity": check_parity(model, ov_runner(info.path), parity_set, precision="int8")}
        candidate["accuracy"] = accuracy_of(info.path)
        candidate["passed"] = candidate["parity"].passed and candidate["accuracy"].passed
        tried.append({"preset": preset, "mean_cosine": candidate["parity"].mean_cosine,
                      "p1_cosine": candidate["parity"].p1_cosine, "cosine_floor_passed": candidate["parity"].passed,
                      "knn_drop": candidate["accuracy"].drop, "accuracy_passed": candidate["accuracy"].passed})
        rank = (candidate["passed"], -candidate["accuracy"].drop)
        if best is None or rank > (best["passed"], -best["accuracy"].drop):
            if best is not None:
                remove_ir(best["info"].path)
            best = candidate
        else:
            remove_ir(info.path)
        if best["passed"]:
            break
    final = export_dir / FILES["openvino-int8"]
    for staged, target in zip((Path(best["info"].path).with_suffix(".bin"), Path(best["info"].path)),
                              (final.with_suffix(".bin"), final)):
        os.replace(staged, target)
    best["info"].path = str(final)
    best["accuracy"].candidate = final.name
    gate(best["parity"], final.name)
    gate(best["accuracy"], None)
    report["openvino-int8"] = {"path": _rel(final, run_dir), "form": "openvino-nncf",
                               "runtime": runtime_description(final),
                               "parity": best["parity"].to_dict(),
                               "accuracy": best["accuracy"].to_dict(),
                               "quantization": best["info"].to_dict() | {"path": _rel(final, run_dir)}}
    if "openvino" not in formats:  # the fp32 IR was only the input to NNCF
        remove_ir(xml)
    return {"calibration": {**calibration.describe, "tried": tried, "preset": best["info"].preset,
                            "decided_by": "kNN accuracy budget (--max-drop), then the INT8 cosine floor"},
            FILES["openvino-int8"]: report["openvino-int8"]["quantization"]}


def _slim(model, onnx_path: Path, parity_set, exporter: str) -> dict[str, Any]:
    """Replace ``onnx_path`` by its onnxslim clean-up if that passes the fp32 parity gate; say what happened."""
    from distillctl.export.onnx import slim_onnx

    candidate = onnx_path.with_name(f".{onnx_path.stem}.slim.onnx")
    try:
        counts = slim_onnx(onnx_path, candidate, DEFAULT_OPSET[exporter])
        parity = check_parity(model, ort_runner(candidate), parity_set, precision="fp32")
        if parity.passed:
            os.replace(candidate, onnx_path)
        return {**counts, "applied": parity.passed, "parity": parity.to_dict()}
    except GateError as exc:  # the slimmed graph failed onnx.checker / the opset read-back: keep the original
        return {"applied": False, "error": exc.message}
    finally:
        candidate.unlink(missing_ok=True)


def _engine(model, export_dir, run_dir, size, precision, config, parity_set, gate) -> tuple[dict, dict]:
    from distillctl.export.tensorrt import EngineRunner, build_engine

    info = build_engine(export_dir, input_size=size, precision=precision, mean=list(config.mean), std=list(config.std))
    tolerance = {"fp32": "gpu-fp32", "fp16": "fp16", "int8": "int8"}[precision]
    parity = check_parity(model, EngineRunner(info.path), parity_set, precision=tolerance)
    gate(parity, Path(info.path).name)
    return info.to_dict() | {"path": _rel(Path(info.path), run_dir)}, {"path": _rel(Path(info.path), run_dir), "precision": precision, "parity": parity.to_dict(),
                            "gpu": info.gpu, "tensorrt_version": info.tensorrt_version}


# ----------------------------------------------------------------------------------------------------
# Data: the run's labelled splits and the eval transform.


class _Splits:
    """Labelled train/test datasets of a run (test = val split, or every 5th train image when there is none)."""

    def __init__(self, train_spec: str, val_spec: str | None, crop_pct: float) -> None:
        from distillctl.data.splits import open_splits

        self.train_spec, self.val_spec, self.crop_pct = train_spec, val_spec, float(crop_pct)
        splits = open_splits(train_spec, val_spec)  # the val split labelled by class name, as in run and eval
        train = splits.train
        if splits.test is not None:
            self.train, self.test, self.holdout = train, splits.test, None
        else:
            every = np.arange(len(train))
            self.train = train.subset(every[every % 5 != 0], name=f"{train.name}[holdout-train]")
            self.test = train.subset(every[every % 5 == 0], name=f"{train.name}[holdout-test: every 5th]")
            self.holdout = "no labelled val split: every 5th train image held out"

    def describe(self) -> dict[str, Any]:
        return {"train": self.train_spec, "val": self.val_spec, "holdout": self.holdout,
                "train_manifest_sha256": self.train.manifest_hash(), "test_manifest_sha256": self.test.manifest_hash(),
                "train_images": len(self.train), "test_images": len(self.test), "crop_pct": self.crop_pct}


def _labelled_splits(run_dir: Path, data: str | None, val_data: str | None, crop_pct: float | None) -> _Splits:
    from distillctl.data.datasets import resolve_splits

    if data is None:
        if not (run_dir / "recipe.yaml").is_file():
            raise UsageError(f"cannot tell which labelled data {run_dir} used (no recipe.yaml)",
                             hint="pass --data (and --val-data) to distillctl export")
        from distillctl.rundir import RunDir

        train_spec, val_spec, recorded_crop = RunDir(run_dir).eval_data()
        return _Splits(train_spec, val_spec, crop_pct if crop_pct is not None else recorded_crop)
    train_spec, val_spec = resolve_splits(data, val_data)
    return _Splits(train_spec, val_spec, crop_pct if crop_pct is not None else 0.875)


def _spread(n: int, count: int) -> np.ndarray:
    """``count`` indices spread evenly over ``range(n)`` (all of them if count >= n)."""
    return np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(np.int64))


def _eval_images(dataset, indices, size: int, config, crop_pct: float,
                 max_bad_fraction: float = 0.01) -> torch.Tensor:
    """Normalised float batch of the centre (eval) views of ``indices`` (parity set, INT8 calibration).

    An unreadable image is replaced by its keyed substitute (any readable image serves a calibration or parity
    sample), counted and reported as in every stage (data/bad_images.py); the limit is judged over the split,
    so a split the evaluation admitted is not refused here for one file that a small sample happened to hit."""
    from distillctl.data.bad_images import BadImages, load_or_substitute
    from distillctl.data.views import ViewSpec, apply_view_uint8, normalize, sample_view

    spec = ViewSpec(size=size, family="centre", crop_pct=crop_pct)
    views, bad = [], BadImages("export", len(dataset), max_bad_fraction)
    for index in indices:
        _, image, unreadable = load_or_substitute(dataset, int(index))
        bad.add(unreadable)
        if image is None:
            raise InputError(f"export: image {int(index)} and its substitutes are unreadable; first: "
                             f"{unreadable[0][0]}: {unreadable[0][1]}", hint="check the data")
        views.append(apply_view_uint8(image, sample_view(spec, int(image.shape[-2]), int(image.shape[-1]), None), spec))
    bad.finish("substituted")
    return normalize(torch.stack(views), tuple(config.mean), tuple(config.std)).contiguous()


# ----------------------------------------------------------------------------------------------------
# Report plumbing.


def _input_spec(config, crop_pct: float) -> dict[str, Any]:
    return {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "color": "RGB",
            "size": list(config.input_size), "mean": list(config.mean), "std": list(config.std),
            "resize": "centre crop of crop_pct x short side, resized to size", "crop_pct": crop_pct,
            "interpolation": "bilinear+antialias", "dynamic_dims": {"0": BATCH_DIM}}


def _flat_entries(report: dict[str, Any]):
    """(name, entry) for every artefact entry, including the nested TensorRT INT8 variant."""
    for name, entry in report.items():
        if isinstance(entry, dict):
            yield name, entry
            if "tensorrt_variant" in entry:
                yield f"{name}-trt", entry["tensorrt_variant"]


def _eval_section(run_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    summary = _read_summary(run_dir)
    section: dict[str, Any] = {}
    for role in ("teacher", "student"):
        if isinstance(summary.get(role), dict) and "knn_top1" in summary[role]:
            section[f"{role}_knn_top1"] = summary[role]["knn_top1"]
    if isinstance(summary.get("eval"), dict):
        section["run"] = summary["eval"]
    for name, entry in _flat_entries(report):
        if "accuracy" in entry:
            section[f"{name}_knn"] = entry["accuracy"]
    return section


def _read_summary(run_dir: Path, strict: bool = False) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except ValueError:
        value = None
    if not isinstance(value, dict):
        if strict:  # never replace a summary we cannot read with one that only holds the export
            raise InputError(f"{path} is not a JSON object; the export report was not merged into it",
                             hint="see export/model_card.json for the export numbers")
        return {}
    return value


def _merge_summary(run_dir: Path, report: dict[str, Any]) -> None:
    """Set ``summary['export']`` (other keys kept), written atomically."""
    summary = _read_summary(run_dir, strict=True)
    summary["export"] = report
    card_module.write_json_atomic(run_dir / "summary.json", summary)


def _rel(path: Path, run_dir: Path) -> str:
    try:
        return Path(path).resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(path)
