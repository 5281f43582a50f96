"""Top-level verbs: run, pretrain, methods, students, recipes. Each maps flags to recipe keys."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from distillctl.cli_common import console, print_json

methods_app = typer.Typer(help="The method catalogue.\n\nExample: distillctl methods show simreg", no_args_is_help=True)
students_app = typer.Typer(help="Student architectures.\n\nExample: distillctl students list", no_args_is_help=True)
recipes_app = typer.Typer(help="Versioned YAML recipes.\n\nExample: distillctl recipes show quickstart", no_args_is_help=True)

# flag → recipe key (every `run` flag maps to exactly one key; --set reaches everything else)
RUN_FLAG_KEYS = {
    "teacher": "teacher.source", "teacher_arch": "teacher.arch", "teacher_format": "teacher.format",
    "teacher_mode": "teacher.mode", "cache": "teacher.cache", "cache_views": "teacher.cache_views",
    "accept_license": "teacher.accept_license", "teacher_bn": "teacher.bn", "sha256": "teacher.sha256",
    "no_verify": "teacher.no_verify", "mirror": "teacher.mirror",
    "student": "student.arch", "method": "method.name", "preset": "method.preset", "data": "data.train", "val_data": "data.val",
    "image_size": "data.image_size", "workers": "data.num_workers", "mean": "data.mean", "std": "data.std",
    "crop_pct": "data.crop_pct",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr", "optimizer": "train.optimizer",
    "amp": "train.amp", "channels_last": "train.channels_last", "compile": "train.compile",
    "device": "train.device", "threads": "train.threads", "seed": "train.seed", "max_steps": "train.max_steps",
    "tensorboard": "train.tensorboard", "out": "out", "name": "name", "export_formats": "export.formats",
}


def _overrides_from_flags(values: dict) -> dict[str, Any]:
    """The flags that were given, as typed recipe overrides (``--name 2024`` stays the string "2024")."""
    overrides: dict[str, Any] = {}
    for flag, key in RUN_FLAG_KEYS.items():
        value = values.get(flag)
        if value is None or value is False:
            continue
        if flag == "export_formats":
            value = [v.strip() for v in value.split(",") if v.strip()]
        if flag in ("mean", "std"):
            value = _triple(flag, value)
        overrides[key] = value
    if values.get("extra_teacher"):
        overrides["teacher.extra"] = [_extra_teacher(v) for v in values["extra_teacher"]]
    return overrides


def _triple(flag: str, value: str) -> list[float]:
    """``--mean 0.49,0.48,0.45`` (or ``[0.49, 0.48, 0.45]``) as the list of floats the recipe key takes."""
    from distillctl.errors import UsageError

    try:
        return [float(v) for v in value.strip().strip("[]").split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{flag} expects three numbers R,G,B, got '{value}'", hint=f"e.g. --{flag} 0.5,0.5,0.5") from None


def _extra_teacher(value: str) -> dict:
    """``--extra-teacher SOURCE`` or ``SOURCE@ARCH`` (the timm architecture of a local checkpoint)."""
    source, sep, arch = value.rpartition("@")
    if not sep or not source or "/" in arch or not arch:
        return {"source": value}
    return {"source": source, "arch": arch}


def _latency_ms(model, image_size: int, repeats: int = 20) -> float:
    import torch

    model = model.eval()
    x = torch.randn(1, 3, image_size, image_size)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    times.sort()
    return 1000 * times[len(times) // 2]


def _render_summary(summary: dict) -> None:
    from distillctl.students import count_parameters, load_student

    table = Table(title=f"distillctl · {summary['method']} · {summary['run_dir']}")
    for column in ("model", "kNN top-1", "params", "latency b=1 (CPU eager)"):
        table.add_column(column)
    image_size = summary["recipe"]["data"]["image_size"]
    student, _ = load_student(summary["run_dir"])
    teacher = summary.get("teacher")
    if teacher:
        from distillctl.teachers.from_run import load_run_as_teacher

        teacher_row = [f"teacher {teacher['arch']}", _pct(teacher.get("knn_top1")), "", ""]
        source = teacher.get("source", "")
        if source.startswith("pretrain:"):
            loaded = load_run_as_teacher(source.split(":", 1)[1], teacher["name"])
            teacher_row[2] = f"{count_parameters(loaded.backbone) / 1e6:.2f}M"
            teacher_row[3] = f"{_latency_ms(loaded.backbone, image_size):.2f} ms"
        table.add_row(*teacher_row)
    table.add_row(f"student {summary['student']['arch']}", _pct(summary["student"].get("knn_top1")),
                  f"{summary['student']['params'] / 1e6:.2f}M", f"{_latency_ms(student, image_size):.2f} ms")
    random_student = summary.get("eval", {}).get("random_student")
    if random_student:
        table.add_row("random-init student", _pct(random_student.get("knn_top1")), "", "")
    console.print(table)
    onnx = (summary.get("export") or {}).get("onnx")
    if onnx:
        parity = onnx.get("parity", {})
        console.print(f"ONNX: {onnx.get('path')} · parity passed={parity.get('passed')} "
                      f"max|Δ|={_round(parity.get('max_abs'), '.2e')} min cos={_round(parity.get('min_cosine'), '.6f')}")
    from distillctl.ci_commands import render_gates

    if (summary.get("gates") or {}).get("checked"):
        render_gates(summary["gates"])
    console.print(f"summary: {summary['run_dir']}/summary.json · wall {summary['wall_s']:.0f}s")


def _is_main_process() -> bool:
    """Under torchrun only rank 0 prints the summary (one JSON object on stdout, one table)."""
    from distillctl.train.distributed import info

    return info().is_main


def _round(value, spec: str) -> str:
    """A number rounded for people (the exact value stays in summary.json)."""
    return "–" if value is None else format(value, spec)


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1f}%"


def run(
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe name (recipes/<name>.yaml) or YAML path."),
    teacher: Optional[str] = typer.Option(None, help="Registry name (r50-moco), timm:<name>, a checkpoint path, or 'pretrain'."),
    teacher_arch: Optional[str] = typer.Option(None, help="timm architecture of a local teacher checkpoint."),
    extra_teacher: Optional[list[str]] = typer.Option(
        None, "--extra-teacher", help="Another teacher for a multi-teacher method (simreg-multi), repeatable: SOURCE "
        "or SOURCE@ARCH; recipe key teacher.extra."),
    teacher_format: Optional[str] = typer.Option(None, help="Checkpoint family of a local file (moco, swav, dino, …)."),
    teacher_mode: Optional[str] = typer.Option(None, help="auto | online | cached (auto: cached where the method allows)."),
    teacher_bn: Optional[str] = typer.Option(None, help="Frozen teacher BatchNorm: method | eval | train."),
    cache: Optional[str] = typer.Option(None, help="Feature-cache directory (built if missing, reused if it matches)."),
    cache_views: Optional[int] = typer.Option(None, help="Stored views per image in the cache."),
    accept_license: bool = typer.Option(False, "--accept-license", help="Accept a non-commercial/custom teacher licence."),
    sha256: Optional[str] = typer.Option(None, help="Pin the teacher file's sha256 (overrides registry/TOFU)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip hash verification (logged; not recommended)."),
    mirror: Optional[str] = typer.Option(None, help="Mirror base URL replacing the teacher's host (or DISTILLCTL_MIRROR)."),
    student: Optional[str] = typer.Option(None, help="Student architecture (mobilenetv2, resnet18, any timm name)."),
    method: Optional[str] = typer.Option(None, help="Distillation method (see: distillctl methods list)."),
    preset: Optional[str] = typer.Option(None, help="auto (default): size queues, warm-ups, lr and EMA momentum to "
                                         "the data and budget; published: the paper's values (method.preset)."),
    data: Optional[str] = typer.Option(None, help="Training data: ImageFolder dir, train/+val/ layout, or builtin:digits."),
    val_data: Optional[str] = typer.Option(None, help="Labelled evaluation ImageFolder."),
    image_size: Optional[int] = typer.Option(None, help="Input resolution (default: the teacher's input size)."),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct", help="Centre-crop share of the short side for "
                                             "evaluation and the cache's centre view (default: the teacher's)."),
    mean: Optional[str] = typer.Option(None, help="Normalisation mean, R,G,B (default: the teacher's), e.g. "
                                       "0.4914,0.4822,0.4465."),
    std: Optional[str] = typer.Option(None, help="Normalisation std, R,G,B (default: the teacher's)."),
    workers: Optional[int] = typer.Option(None, help="Data-loading worker processes."),
    threads: Optional[int] = typer.Option(None, min=1, help="Intra-op threads per process (default: OMP_NUM_THREADS, "
                                          "else the cores available / processes on this node - loader workers)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size (split across ranks)."),
    lr: Optional[float] = typer.Option(None, help="Base learning rate."),
    optimizer: Optional[str] = typer.Option(None, help="sgd | adamw | lars."),
    amp: Optional[str] = typer.Option(None, help="none | bf16 | fp16."),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels_last memory format."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the student."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
    seed: Optional[int] = typer.Option(None, help="Run seed (data order, views, init)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N optimizer steps (schedule still spans --epochs)."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also log metrics to TensorBoard."),
    export_formats: Optional[str] = typer.Option(None, "--export", help="Export formats, e.g. onnx,onnx-int8."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<name>)."),
    name: Optional[str] = typer.Option(None, help="Run name."),
    set_: list[str] = typer.Option([], "--set", help="Override any recipe key: --set train.lr=0.1 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint (required to exist)."),
    restart: bool = typer.Option(False, "--restart", help="Discard checkpoints and finished stages of this run."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Run on N local processes (relaunches itself under torchrun)."),
) -> None:
    """Distil a teacher into a student: teacher → cache → distill → eval → export.

    Examples:\n
      distillctl run --recipe quickstart\n
      distillctl run --teacher ./r50.safetensors --teacher-arch resnet50 --student mobilenetv2 --method simreg --data /data/train --val-data /data/val --epochs 100
    """
    from distillctl.config import load_recipe
    from distillctl.errors import UsageError

    if resume and restart:
        raise UsageError("--resume and --restart are mutually exclusive")
    flags = dict(locals())
    if recipe is None and flags.get("teacher") is None and flags.get("method") is None:
        raise UsageError("nothing to run: pass --recipe, or --teacher/--method/--data", hint="distillctl run --recipe quickstart")
    resolved = load_recipe(recipe, _overrides_from_flags(flags), sets=set_)
    if nproc is not None:  # the recipe is checked above, before any process starts
        from distillctl.launch import relaunch

        sys.exit(relaunch(nproc))  # SystemExit: the exit code must survive click's standalone_mode=False
    from distillctl.api import run as api_run
    from distillctl.errors import GateError

    try:
        summary = api_run(resolved, resume=resume, restart=restart).data
    except GateError:  # summary.json is complete: CI still gets the numbers (one JSON object) before exit 3
        if json_out and _is_main_process():
            from distillctl.pipeline import run_dir_for

            print_json(run_dir_for(resolved).summary())
        raise
    if not _is_main_process():
        return
    if json_out:
        print_json(summary)
    else:
        _render_summary(summary)


def pretrain(
    method: str = typer.Option("mocov2", help="SSL method: mocov2, simclr, ssl-small, byol, dino."),
    arch: str = typer.Option("resnet18", help="Architecture to pretrain."),
    data: str = typer.Option("builtin:digits", help="Training data."),
    val_data: Optional[str] = typer.Option(None, help="Labelled evaluation data."),
    epochs: int = typer.Option(20, help="Epochs."),
    batch_size: int = typer.Option(128, help="Global batch size."),
    lr: float = typer.Option(0.06, help="Base learning rate."),
    image_size: int = typer.Option(32, help="Input resolution."),
    crop_pct: float = typer.Option(1.0, "--crop-pct", help="Centre-crop share of the short side for evaluation."),
    mean: Optional[str] = typer.Option(None, help="Normalisation mean, R,G,B (default ImageNet's)."),
    std: Optional[str] = typer.Option(None, help="Normalisation std, R,G,B (default ImageNet's)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory."),
    set_: list[str] = typer.Option([], "--set", help="Override any recipe key."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Run on N local processes (relaunches itself under torchrun)."),
) -> None:
    """Self-supervised training without a teacher (teachers for quickstarts; the 'student alone' baseline).

    Example: distillctl pretrain --method mocov2 --arch resnet18 --data builtin:digits --epochs 20
    """
    from distillctl.config import build_recipe
    from distillctl.errors import UsageError
    from distillctl.methods.base import get_method
    from distillctl.pipeline import RunOptions, run_pipeline

    if get_method(method).kind != "ssl":
        raise UsageError(f"{method} is a distillation method; pretrain takes SSL methods",
                         hint="distillctl methods list shows the kind of each method")
    base = {"name": f"pretrain-{method}-{arch}", "teacher": {"source": "none"}, "student": {"arch": arch},
            "method": {"name": method}, "data": {"train": data, "val": val_data, "image_size": image_size,
                                                  "crop_pct": crop_pct},
            "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr}, "export": {"enabled": False}}
    if out:
        base["out"] = out
    normalisation = {f"data.{key}": _triple(key, value) for key, value in (("mean", mean), ("std", std)) if value}
    built = build_recipe(base, normalisation, sets=set_)
    if nproc is not None:
        from distillctl.launch import relaunch

        sys.exit(relaunch(nproc))  # SystemExit: the exit code must survive click's standalone_mode=False
    summary = run_pipeline(built, RunOptions(resume=resume))
    if not _is_main_process():
        return
    if json_out:
        print_json(summary)
    else:
        _render_summary(summary)


@methods_app.command("list")
def methods_list(json_out: bool = typer.Option(False, "--json", help="JSON output.")) -> None:
    """List every method with its kind, teacher mode and what the benchmark measured (which works best at which budget).

    Example: distillctl methods list --json
    """
    from distillctl.method_catalogue import rows as catalogue_rows
    from distillctl.methods import measured

    bench = measured.load()
    # a static index while it matches the method files: no torch import
    rows = [{**row, "measured": measured.cells(bench, row["name"]),
             "measured_dense_suite": measured.dense_suite_cells(bench, row["name"]),
             "measured_ssl_teacher": measured.ssl_teacher_cells(bench, row["name"])} for row in catalogue_rows()]
    if json_out:
        print_json({"methods": rows, "measured_source": bench.get("source") or {}})
        return
    table = Table(title="distillctl methods", caption=escape(measured.source_line(bench)), caption_justify="left")
    for column in ("name", "kind", "teachers", "teacher mode", "measured kNN % (images: rank)", "paper"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["kind"], row["teachers"], row["teacher_mode"], measured.summary(bench, row["name"]),
                      escape(row["title"]))
    console.print(table)


def _probe_method(cls):
    """An instance with default params and small made-up teacher sizes (one per teacher of a multi-teacher method)."""
    from distillctl.methods.base import TeacherDims

    dims = TeacherDims(64, 32)
    return cls(cls.Params(), 64, [dims, dims] if cls.multi_teacher else dims)


def _teacher_count(cls) -> str:
    return "0" if cls.kind == "ssl" else ("2+" if cls.multi_teacher else "1")


@methods_app.command("show")
def methods_show(name: str, json_out: bool = typer.Option(False, "--json", help="JSON output.")) -> None:
    """Objective, defaults, cache compatibility and published numbers of one method.

    Example: distillctl methods show seed
    """
    from distillctl.methods import measured
    from distillctl.methods.base import get_method
    from distillctl.methods.presets import recipe_summary

    cls = get_method(name)
    defaults = cls.Params().model_dump(mode="json")
    mode = _probe_method(cls).requirements(32).teacher_mode
    bench = measured.load()
    info = {"name": name, "kind": cls.kind, "title": cls.title, "objective": cls.objective,
            "published": cls.published, "teacher_mode": mode, "teachers": _teacher_count(cls), "defaults": defaults,
            "sources": cls.sources, "assumptions": list(cls.assumptions), "preset": recipe_summary(cls),
            "measured": measured.cells(bench, name), "measured_dense_suite": measured.dense_suite_cells(bench, name),
            "measured_ssl_teacher": measured.ssl_teacher_cells(bench, name), "measured_source": bench.get("source") or {}}
    if json_out:
        print_json(info)
        return
    console.print(f"[bold]{escape(cls.title)}[/]\n\n{escape(cls.objective)}\n\n[bold]teachers:[/] {_teacher_count(cls)}"
                  f"{' (teacher.source + teacher.extra / --extra-teacher)' if cls.multi_teacher else ''}\n"
                  f"[bold]teacher mode:[/] {mode}\n"
                  f"[bold]published:[/] {escape(cls.published)}\n[bold]defaults (method.params):[/]")
    for key, value in defaults.items():
        console.print(f"  {key}: {value}", highlight=False)
    if cls.sources:
        console.print(f"[bold]sources:[/] {escape(cls.sources)}")
    if cls.assumptions:
        console.print("[bold]assumptions:[/]")
        for assumption in cls.assumptions:
            console.print(f"  - {escape(assumption)}", highlight=False)
    _print_lr(info["preset"], measured.ran_lr(bench, name), measured.summary(bench, name))
    if not info["measured"] and info["measured_dense_suite"]:
        console.print(f"[bold]benchmark (benchmarks/RESULTS.md, dense features):[/] kNN "
                      f"{escape(measured.summary(bench, name))}", highlight=False)
        for line in measured.dense_context(bench, name):
            console.print(f"  {escape(line)}", highlight=False)
    for line in measured.ssl_teacher_summary(bench, name):
        console.print(f"[bold]benchmark from an SSL teacher:[/] kNN {escape(line)}", highlight=False)


def _print_lr(preset: dict | None, ran: str | None, measured_summary: str) -> None:
    """The learning rates a user meets: the paper's, what method.preset=auto derives, what the benchmark ran."""
    if preset and "lr" in preset:
        rule = {"none": "not scaled by batch", "linear": "linear in the batch", "sqrt": "square root of the batch"}
        example = preset["auto_lr_example"]
        console.print(f"[bold]learning rate:[/] published {preset['lr']:g} at batch {preset['batch']} "
                      f"({preset['optimizer']}, {rule[preset['published_rule']]}); method.preset=auto: "
                      f"{rule[preset['auto_rule']]} ({escape(preset['rule_source'])}), e.g. {example['lr']:g} at batch "
                      f"{example['batch']}" + ("" if preset["optimizer"] == "sgd" else
                                              f" when train.optimizer={preset['optimizer']}"), highlight=False)
        short = preset.get("short_run")
        if short:
            console.print(f"[bold]short runs (method.preset=auto):[/] up to {short['max_images']:,} images seen "
                          f"({100 * short['max_share']:g}% of the paper's run) start from lr {short['lr']:g} at batch "
                          f"{preset['batch']} instead (e.g. {short['example_lr']:g} at batch {example['batch']})"
                          + (f" with {', '.join(f'{k}={v}' for k, v in short['params'].items())}"
                             if short.get("params") else "")
                          + (f", warm-ups over {100 * short['warmup_share']:g}% of the run"
                             if short.get("warmup_share") is not None else "")
                          + f": {escape(short['evidence'])}", highlight=False)
    if preset and preset.get("sized_params"):
        console.print(f"[bold]sized by method.preset=auto:[/] {', '.join(preset['sized_params'])}", highlight=False)
    if ran:
        console.print(f"[bold]benchmark (benchmarks/RESULTS.md):[/] ran at lr {escape(ran)}; kNN {measured_summary}",
                      highlight=False)


@students_app.command("list")
def students_list(json_out: bool = typer.Option(False, "--json", help="JSON output.")) -> None:
    """Student aliases and the models they map to (any timm name, or tv:<torchvision name>, works too).

    Example: distillctl students list
    """
    from distillctl.student_aliases import STUDENT_ALIASES

    if json_out:
        print_json({"students": STUDENT_ALIASES})
        return
    table = Table(title="student aliases (any timm model name, or tv:<torchvision model name>, is accepted too)")
    table.add_column("alias")
    table.add_column("model (timm name, or tv:<torchvision name>)")
    for alias, arch in STUDENT_ALIASES.items():
        table.add_row(alias, arch)
    console.print(table)


@recipes_app.command("list")
def recipes_list(json_out: bool = typer.Option(False, "--json", help="JSON output.")) -> None:
    """Recipes shipped in recipes/.

    Example: distillctl recipes list
    """
    from distillctl.config import list_recipes, read_yaml

    rows = [{"name": p.stem, "path": str(p), "description": (read_yaml(p).get("description") or "").strip()}
            for p in list_recipes()]
    if json_out:
        print_json({"recipes": rows})
        return
    table = Table(title="recipes")
    table.add_column("name")
    table.add_column("description")
    for row in rows:
        table.add_row(row["name"], row["description"])
    console.print(table)


@recipes_app.command("show")
def recipes_show(name: str, resolved: bool = typer.Option(False, "--resolved", help="Show with every default filled in."),
                 json_out: bool = typer.Option(False, "--json", help="Print {name, path, recipe} as one JSON object.")) -> None:
    """Print a recipe (as written, or fully resolved).

    Example: distillctl recipes show quickstart --resolved
    """
    from distillctl.config import find_recipe, load_recipe

    path = find_recipe(name)
    if json_out:
        from distillctl.config import read_yaml

        recipe = load_recipe(str(path)).model_dump(mode="json") if resolved else read_yaml(path)
        print_json({"name": path.stem, "path": str(path), "resolved": resolved, "recipe": recipe})
        return
    text = load_recipe(str(path)).to_yaml() if resolved else path.read_text()
    typer.echo(text.rstrip())


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("pretrain")(pretrain)
    app.add_typer(methods_app, name="methods")
    app.add_typer(students_app, name="students")
    app.add_typer(recipes_app, name="recipes")
