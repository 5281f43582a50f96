"""Release bundles: what a CI pipeline ships, and how the receiving side checks it.

``distillctl export RUN --bundle OUT`` writes::

    OUT/model/<artefact>            every deployable file of <run>/export (ONNX fp32/fp16/INT8, OpenVINO, engines)
    OUT/model_card.json             the run's model card (it vouches for the artefacts by sha256)
    OUT/summary.json                the run's summary.json (metrics, gates, resolved recipe)
    OUT/samples/inputs.npy          N preprocessed held-out images (float32 NCHW, the model's input)
    OUT/samples/reference.npy       the PyTorch student's fp32 embeddings of those images
    OUT/samples/samples.json        which images (split, indices, labels), preprocessing, tolerance per artefact
    OUT/manifest.json               sha256 and size of every file above, and the bundle format
    OUT/SHA256SUMS                  the same hashes for ``sha256sum -c SHA256SUMS``

``distillctl verify OUT`` re-hashes every file (a missing, changed or unlisted file is a mismatch) and re-runs
the parity gate of each ONNX artefact and OpenVINO IR on the samples against the reference embeddings (the
export's tolerances: fp32, fp16, int8; an IR is reported as skipped where the OpenVINO extra is not installed).
Any mismatch is exit 3.

Reproducible: the same run gives the same bytes. Files are copied byte for byte, the samples are the evenly
spread indices of the run's held-out split (no randomness), arrays are written with ``np.save`` (no
timestamps), JSON with sorted keys, and nothing records the time or the output path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from distillctl.errors import GateError, InputError, UsageError

BUNDLE_FORMAT = "distillctl-bundle/1"
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
UNHASHED = (MANIFEST, SUMS)  # the manifest lists every other file


def artefact_precision(name: str) -> str | None:
    """Parity tolerance of a runnable artefact from its file name: ONNX files and OpenVINO IRs (``.xml``; its
    ``.bin`` is hashed with it). None: a file that is hashed only (e.g. a TensorRT engine)."""
    if name.endswith(".openvino.xml"):
        return "int8" if ".int8" in name else "fp32"
    if not name.endswith(".onnx"):
        return None
    if ".int8" in name:
        return "int8"
    if ".fp16" in name:
        return "fp16"
    return "fp32"


def _deployables(export_dir: Path) -> list[Path]:
    """Every deployable file under ``export/`` (not the card, not hidden temp files), in a fixed order."""
    files = [path for path in export_dir.rglob("*") if path.is_file()]
    keep = [path for path in files if path.name != "model_card.json"
            and not any(part.startswith(".") for part in path.relative_to(export_dir).parts)]
    return sorted(keep, key=lambda path: path.relative_to(export_dir).as_posix())


def write_bundle(run_dir: Path, out: Path, *, samples: int = 8) -> dict[str, Any]:
    """Write the release bundle of an exported run into ``out`` (must not exist, or be an empty directory)."""
    from distillctl.rundir import RunDir

    run = RunDir(run_dir).require()
    summary = run.summary()
    export = summary.get("export") or {}
    if not (run.export_dir / "student.onnx").is_file() or not (run.export_dir / "model_card.json").is_file():
        raise InputError(f"{run.path} has no exported student (export/student.onnx, export/model_card.json)",
                         hint=f"distillctl export {run.path} --format onnx,onnx-int8 --bundle {out}")
    if export.get("passed") is False:
        raise GateError(f"{run.path}: the last export failed its gates; a bundle ships only gated artefacts",
                        hint="see summary.json 'export', fix and re-export")
    if (summary.get("gates") or {}).get("passed") is False:
        raise GateError(f"{run.path}: quality gates failed ({', '.join(summary['gates'].get('failed', []))}); "
                        "not bundling", hint=f"distillctl gate {run.path}")
    if samples < 1:
        raise UsageError("--bundle-samples must be >= 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"bundle directory {out} exists and is not empty", hint="choose a new --bundle path")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_contents(run, staging, samples)
        if out.exists():
            out.rmdir()
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest = json.loads((out / MANIFEST).read_text())
    from distillctl.rundir import file_sha256

    return {"path": str(out), "files": len(manifest["files"]), "manifest_sha256": file_sha256(out / MANIFEST)}


def _write_contents(run, staging: Path, samples: int) -> None:
    from distillctl.export.card import write_json_atomic

    model_dir = staging / "model"
    model_dir.mkdir(parents=True)
    artefacts = _deployables(run.export_dir)
    for path in artefacts:
        target = model_dir / path.relative_to(run.export_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    shutil.copyfile(run.export_dir / "model_card.json", staging / "model_card.json")
    shutil.copyfile(run.path / "summary.json", staging / "summary.json")
    sample_dir = staging / "samples"
    sample_dir.mkdir()
    inputs, reference, described = _samples(run.path, samples)
    np.save(sample_dir / "inputs.npy", inputs)
    np.save(sample_dir / "reference.npy", reference)
    described["tolerances"] = {f"model/{path.relative_to(run.export_dir).as_posix()}": precision
                               for path in artefacts if (precision := artefact_precision(path.name))}
    _check_parity(staging, described["tolerances"], inputs, reference)  # never ship a bundle that fails verify
    write_json_atomic(sample_dir / "samples.json", described)
    files = {rel: _entry(staging / rel) for rel in _listing(staging)}
    write_json_atomic(staging / MANIFEST, {"format": BUNDLE_FORMAT, "files": files,
                                           "parity": "samples/samples.json (tolerances) against samples/reference.npy"})
    (staging / SUMS).write_text("".join(f"{entry['sha256']}  {rel}\n" for rel, entry in files.items()))


def _samples(run_dir: Path, count: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Evenly spread held-out images (deterministic), preprocessed, and the PyTorch student's embeddings."""
    import torch

    from distillctl.export.api import _eval_images, _labelled_splits, _spread
    from distillctl.students import load_student

    model, config = load_student(run_dir, exportable=True)
    splits = _labelled_splits(run_dir, None, None, None)
    indices = _spread(len(splits.test), count)
    images = _eval_images(splits.test, indices, int(config.input_size[-1]), config, splits.crop_pct)
    with torch.no_grad():
        reference = model.eval().float()(images).float().numpy()
    labels = [int(splits.test.labels[int(i)]) for i in indices] if hasattr(splits.test, "labels") else None
    described = {"split": splits.describe(), "indices": [int(i) for i in indices], "labels": labels,
                 "input": {"shape": list(images.shape), "dtype": "float32", "layout": "NCHW",
                           "mean": list(config.mean), "std": list(config.std), "crop_pct": splits.crop_pct},
                 "reference": "PyTorch student (student/model.safetensors), eval mode, fp32, CPU"}
    return np.ascontiguousarray(images.numpy(), dtype=np.float32), np.ascontiguousarray(reference), described


def _listing(root: Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                  if path.is_file() and path.relative_to(root).as_posix() not in UNHASHED)


def _entry(path: Path) -> dict[str, Any]:
    from distillctl.rundir import file_sha256

    return {"sha256": file_sha256(path), "size_bytes": path.stat().st_size}


def _runner(path: Path):
    """(CPU runner of one artefact, None) for ONNX Runtime or OpenVINO; (None, why) when its runtime is missing."""
    from distillctl.export.parity import ort_runner

    if path.suffix != ".xml":
        return ort_runner(path, threads=1), None
    from distillctl.export.openvino import ov_runner, require_openvino

    try:
        require_openvino()
    except UsageError as exc:
        return None, f"the OpenVINO runtime is not installed: {exc.hint}"
    return ov_runner(path, threads=1), None


def _check_parity(root: Path, tolerances: dict[str, str], inputs: np.ndarray, reference: np.ndarray) -> dict:
    """Parity of every runnable artefact on the samples (batch 1 and all); GateError naming the failures. An
    OpenVINO IR on a machine without the extra is reported as skipped (its bytes are still checked by hash)."""
    from distillctl.export.parity import TOLERANCES, _run_batched, evaluate_parity

    results, failures = {}, []
    for rel, precision in tolerances.items():
        runner, missing = _runner(root / rel)
        if runner is None:
            results[rel] = {"precision": precision, "passed": None, "skipped": missing}
            continue
        outputs = {batch: _run_batched(runner, inputs, batch) for batch in sorted({1, len(inputs)})}
        result = evaluate_parity(reference.astype(np.float64), outputs, TOLERANCES[precision])
        results[rel] = {"precision": precision, "passed": result.passed, "min_cosine": round(result.min_cosine, 8),
                        "max_abs": float(f"{result.max_abs:.4g}"), "failures": result.failures}
        if not result.passed:
            failures.append(f"{rel}: " + "; ".join(result.failures))
    if failures:
        raise GateError("bundle parity failed: " + " | ".join(failures),
                        hint="the artefact no longer computes the reference embeddings of samples/")
    return results


def verify_bundle(root: Path) -> dict[str, Any]:
    """Re-hash every file against manifest.json and re-run parity on the samples. GateError (3) on any mismatch,
    InputError (2) when ``root`` is not a bundle."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{root} is not a distillctl bundle (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != BUNDLE_FORMAT or not isinstance(files, dict):
            raise ValueError(manifest.get("format"))
    except (ValueError, KeyError, TypeError) as exc:
        raise GateError(f"{manifest_path} is damaged or not a {BUNDLE_FORMAT} manifest ({type(exc).__name__})") from None
    problems = []
    for rel, expected in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        actual = _entry(path)
        if actual["sha256"] != expected.get("sha256"):
            problems.append(f"{rel}: sha256 {actual['sha256'][:12]}… != manifest {str(expected.get('sha256'))[:12]}…")
    unlisted = sorted(set(_listing(root)) - set(files))
    problems += [f"{rel}: not in the manifest" for rel in unlisted]
    if problems:
        raise GateError(f"bundle {root}: {len(problems)} file(s) do not match the manifest: " + "; ".join(problems),
                        hint="the bundle was changed after it was written; rebuild it with distillctl export --bundle")
    described = json.loads((root / "samples" / "samples.json").read_text())
    inputs = np.load(root / "samples" / "inputs.npy", allow_pickle=False)
    reference = np.load(root / "samples" / "reference.npy", allow_pickle=False)
    parity = _check_parity(root, described["tolerances"], inputs, reference)
    return {"bundle": str(root), "files": len(files), "hashes": "ok", "parity": parity, "passed": True}
