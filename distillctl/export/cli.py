"""``distillctl export`` and ``distillctl bench`` (top-level commands, added by :func:`register`).

Heavy imports (torch, onnx, onnxruntime) happen inside the commands, so ``distillctl --help``
stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from distillctl.cli_common import console, print_json
from distillctl.errors import UsageError

EXPORT_HELP = """Export a run's student to ONNX (fp32 / fp16 / INT8), OpenVINO IR (fp32 / INT8) or a TensorRT engine, with parity and accuracy gates.

Writes <run>/export/student.onnx (+ student.fp16.onnx, student.int8.onnx, student.int8.trt.onnx,
student.openvino.xml, student.int8.openvino.xml, student.<precision>.<gpu>.trt<ver>.engine) and
export/model_card.json, and merges the report into summary.json. INT8 artefacts pass when their kNN
drop is within --max-drop and their embedding cosine above the INT8 floor. Exit 3 when a gate fails
(the numbers are still written); exit 2 when an optional extra (openvino, tensorrt, slim) is missing.

Example: distillctl export runs/quickstart --format onnx,onnx-int8 --calib-size 512
"""

BENCH_HELP = """Latency (p50/p90) and throughput of every exported format side by side, and the fastest one that passed its gates.

Formats: PyTorch, ONNX Runtime fp32/fp16/INT8 (CPU form and TensorRT form), OpenVINO fp32/INT8, TensorRT
engines where present. Each row carries the artefact's export verdict (parity + kNN budget); speed-ups
are against ONNX Runtime fp32 at the same batch and thread count.

Example: distillctl bench runs/quickstart --batch 1,32 --threads 1 --json
"""


def _split_csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _batches(value: str, flag: str = "--batch") -> list[int]:
    try:
        batches = [int(item) for item in _split_csv(value)]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got '{value}'") from None
    if not batches or min(batches) < 1:
        raise UsageError(f"{flag} values must be >= 1, got '{value}'")
    return batches


def export_command(
    run_dir: Path = typer.Argument(..., help="Run directory with student/model.safetensors and student/config.json."),
    format: str = typer.Option("onnx", "--format", "-f", help="Comma-separated: onnx, onnx-fp16, onnx-int8, openvino, openvino-int8 (distillctl[openvino]), engine, engine-int8 (distillctl[tensorrt])."),
    calib_data: str = typer.Option(None, "--calib-data", help="Images for INT8 calibration (ImageFolder or builtin:NAME); default: the run's train split."),
    calib_size: int = typer.Option(512, "--calib-size", help="Number of calibration images (eval transform)."),
    calib_method: str = typer.Option("auto", "--calib-method", help="INT8 calibration: auto (minmax, percentile and "
                                     "entropy ranked by embedding cosine, the first within the kNN budget kept; then the "
                                     "most sensitive layers left in float), minmax, percentile or entropy."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="INT8 budget: largest allowed kNN top-1 drop vs fp32, in points."),
    half: bool = typer.Option(False, "--half", help="Build the TensorRT engine in fp16."),
    exporter: str = typer.Option("dynamo", "--exporter", help="dynamo (opset 18, default) or legacy (TorchScript, opset 17)."),
    parity_images: int = typer.Option(64, "--parity-images", help="Held-out images for the parity gates."),
    data: str = typer.Option(None, "--data", help="Labelled train data (overrides the run's recorded data)."),
    val_data: str = typer.Option(None, "--val-data", help="Labelled eval data (overrides the run's recorded data)."),
    bundle: Path = typer.Option(None, "--bundle", help="Also write a release bundle here: artefacts, model card, "
                                "summary.json, sample inputs + reference embeddings, sha256 manifest (distillctl verify)."),
    bundle_samples: int = typer.Option(8, "--bundle-samples", help="Held-out sample images in the bundle."),
    int8_form: str = typer.Option("auto", "--int8-form", help="Layout of student.int8.onnx: auto (qdq-u8s8 on x86-64, "
                                  "qdq-s8s8 elsewhere), qdq-u8s8, qoperator-u8s8 or qdq-s8s8. student.int8.trt.onnx is "
                                  "always the symmetric TensorRT form."),
    slim: bool = typer.Option(False, "--slim", help="Clean the fp32 graph with onnxslim first (kept only if it passes "
                              "the fp32 parity gate; needs distillctl[slim])."),
    json_out: bool = typer.Option(False, "--json", help="Print the export report as one JSON object on stdout."),
    teacher_cotrained: bool = typer.Option(False, "--teacher-cotrained", help="Export the co-trained teacher "
                                           "(student/teacher_cotrained.safetensors of a dogo/oss/simdis-online run) "
                                           "instead of the student: its embedding backbone, same formats and gates, "
                                           "into <run>/teacher_cotrained/export."),
) -> None:
    from distillctl.export.api import export_config, export_run
    from distillctl.errors import GateError

    if not run_dir.is_dir():
        from distillctl.errors import InputError

        raise InputError(f"run directory does not exist: {run_dir}")
    if teacher_cotrained:  # <run>/teacher_cotrained is written into the run: hold the run's lock (runlock.py)
        from distillctl.runlock import hold

        with hold(run_dir, create=False):
            export_command(cotrained_teacher_run(run_dir), format=format, calib_data=calib_data,
                           calib_size=calib_size, calib_method=calib_method, max_drop=max_drop, half=half,
                           exporter=exporter, parity_images=parity_images, data=data, val_data=val_data,
                           bundle=bundle, bundle_samples=bundle_samples, int8_form=int8_form, slim=slim,
                           json_out=json_out, teacher_cotrained=False)
        return
    try:
        section = export_config(_split_csv(format), calib_data=calib_data, calib_size=calib_size,
                                calib_method=calib_method, max_drop=max_drop, half=half, exporter=exporter,
                                parity_images=parity_images, int8_form=int8_form, slim=slim)
        report = export_run(run_dir, section, data=data, val_data=val_data)
    except GateError:
        _render_export_from_summary(run_dir, json_out)
        raise
    if bundle is not None:
        from distillctl.export.bundle import write_bundle

        report["bundle"] = write_bundle(run_dir, bundle, samples=bundle_samples)
    _render_export(report, json_out)
    if bundle is not None and not json_out:
        console.print(f"bundle: {report['bundle']['path']} ({report['bundle']['files']} files; "
                      f"check with: distillctl verify {report['bundle']['path']})", highlight=False)


def cotrained_teacher_run(run_dir: Path) -> Path:
    """``<run>/teacher_cotrained``: a run directory whose "student" is the co-trained teacher's backbone, so the
    export (parity and accuracy gates, model card, bundle) runs on it unchanged. Built from
    ``student/teacher_cotrained.safetensors`` (``backbone.*`` weights; a projection head is not part of the
    embedding) and the student's config (input size, normalisation), the run's recipe.yaml and summary.json."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from distillctl.errors import InputError

    weights = run_dir / "student" / "teacher_cotrained.safetensors"
    config_path = run_dir / "student" / "config.json"
    if not weights.is_file() or not config_path.is_file():
        raise InputError(f"no co-trained teacher in {run_dir} (expected student/teacher_cotrained.safetensors "
                         "and student/config.json)", hint="--teacher-cotrained needs a run of a co-trained method "
                         "(dogo, oss, simdis with online: true)")
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata() or {}
        state = {key[len("backbone."):]: handle.get_tensor(key) for key in handle.keys() if key.startswith("backbone.")}
    if not state or "arch" not in metadata:
        raise InputError(f"{weights} holds no teacher backbone weights or architecture",
                         hint="rerun the co-trained method with --restart")
    config = json.loads(config_path.read_text())
    target = run_dir / "teacher_cotrained"
    (target / "student").mkdir(parents=True, exist_ok=True)
    from distillctl.students import create_backbone, feature_dim, resolve_arch, student_library

    arch = resolve_arch(metadata["arch"])  # its own library, whatever the student's was
    model = create_backbone(arch, img_size=config["input_size"][-1])
    config.update(arch=arch, library=student_library(arch), num_features=feature_dim(model), model_kwargs=None,
                  teacher={"source": metadata.get("source"), "role": "co-trained teacher of this run"})
    save_file(state, str(target / "student" / "model.safetensors"))
    (target / "student" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in ("recipe.yaml", "summary.json"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, target / name)
    return target


def _render_export_from_summary(run_dir: Path, json_out: bool) -> None:
    """After a failed gate, still show what was measured (export_run wrote it before raising)."""
    import json

    try:
        report = json.loads((run_dir / "summary.json").read_text()).get("export")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(report, dict):
        _render_export(report, json_out)


def _render_export(report: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(report)
        return
    from rich.table import Table

    table = Table(title="distillctl export", show_lines=False)
    for column in ("artefact", "gate", "max|Δ|", "min cos", "mean cos", "kNN top-1 (fp32 → this)", "passed"):
        table.add_column(column, no_wrap=column == "artefact")
    for name, entry in _entries(report):
        parity = entry.get("parity")
        if not parity:
            table.add_row(name, "-", "-", "-", "-", entry.get("skipped", "-"), "-")
            continue
        accuracy = entry.get("accuracy")
        knn = (f"{accuracy['reference_top1']:.2f} → {accuracy['candidate_top1']:.2f} (Δ {accuracy['drop']:+.2f}, "
               f"budget {accuracy['max_drop']:g})") if accuracy else "-"
        ok = parity["passed"] and (accuracy is None or accuracy["passed"])
        table.add_row(Path(entry.get("path", name)).name, parity["tolerance"]["name"], f"{parity['max_abs']:.2e}",
                      f"{parity['min_cosine']:.6f}", f"{parity['mean_cosine']:.6f}", knn,
                      "[green]yes[/]" if ok else "[bold red]NO[/]")
    console.print(table)
    if "model_card" in report:
        console.print(f"model card: {report['model_card']}")


def _entries(report: dict[str, Any]):
    for name, entry in report.items():
        if isinstance(entry, dict):
            yield name, entry
            if isinstance(entry.get("tensorrt_variant"), dict):
                yield f"{name} (TensorRT QDQ)", entry["tensorrt_variant"]


def bench_command(
    run_dir: Path = typer.Argument(..., help="Run directory (exported artefacts are read from <run>/export)."),
    formats: str = typer.Option("all", "--formats", help="Comma-separated: all (torch + every exported artefact), "
                                "torch, onnx, onnx-fp16, onnx-int8, onnx-int8-trt, openvino, openvino-int8, engine."),
    batch: str = typer.Option("1,32", "--batch", help="Comma-separated batch sizes."),
    threads: str = typer.Option(None, "--threads", help="Comma-separated intra-op thread counts (torch, ONNX Runtime "
                                "and OpenVINO alike); default: torch's current count."),
    repeats: int = typer.Option(20, "--repeats", help="Timed calls per (format, batch), after warm-up."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed warm-up calls per (format, batch)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (schema, results, fastest) on stdout."),
) -> None:
    from distillctl.export.bench import bench_report, bench_run

    if not run_dir.is_dir():
        from distillctl.errors import InputError

        raise InputError(f"run directory does not exist: {run_dir}")
    thread_counts = _batches(threads, "--threads") if threads else None
    rows = bench_run(run_dir, _split_csv(formats), _batches(batch), repeats=repeats, warmup=warmup,
                     threads=thread_counts)
    report = bench_report(run_dir, rows)
    if json_out:
        print_json(report)
        return
    from rich.table import Table

    table = Table(title="distillctl bench")
    for column in ("format", "threads", "batch", "p50 ms", "p90 ms", "img/s", "× onnx fp32", "gate", "size MB"):
        table.add_column(column, justify="right" if column not in ("format", "gate") else "left")
    for row in rows:
        speedup = row["speedup_vs_onnx_fp32"]
        table.add_row(row["format"], str(row["threads"]), str(row["batch"]), f"{row['p50_ms']:.3f}",
                      f"{row['p90_ms']:.3f}", f"{row['images_per_sec']:.1f}", f"{speedup:.2f}" if speedup else "-",
                      row["gate"], f"{row['size_mb']:.2f}")
    console.print(table)
    for best in report["fastest"]:
        speedup = f", {best['speedup_vs_onnx_fp32']:.2f}× ONNX Runtime fp32" if best["speedup_vs_onnx_fp32"] else ""
        console.print(f"fastest passing format at batch {best['batch']}, {best['threads']} thread(s): "
                      f"[bold]{best['format']}[/] ({best['images_per_sec']:.1f} img/s{speedup})")


def register(app: typer.Typer) -> None:
    """Add ``export`` and ``bench`` as top-level commands of the main app."""
    app.command("export", help=EXPORT_HELP)(export_command)
    app.command("bench", help=BENCH_HELP)(bench_command)
