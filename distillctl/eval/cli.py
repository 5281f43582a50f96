"""``distillctl eval knn|linear TARGET``: evaluate frozen embeddings of a run, a student dir or an artefact.

TARGET is a run directory, its ``student/`` directory, or an exported file (``.onnx``, INT8 ``.onnx``,
``.engine`` where TensorRT is installed) — the same protocol for all, so an artefact's accuracy is
directly comparable with its checkpoint's. ``teacher:<name|timm:tag|file>`` measures a teacher under the
same protocol (its own input size and normalisation unless ``--input-size`` overrides). Labelled splits come from ``--data/--val-data`` or, when
TARGET lives in a run directory, from the run's recipe. Embeddings are cached under
``<run>/eval_cache`` (or ``--cache-dir``) keyed by weights sha256 + data manifest + transform.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import typer
from rich.table import Table

from distillctl.cli_common import console, print_json
from distillctl.errors import UsageError

app = typer.Typer(
    help="Evaluate frozen embeddings (weighted kNN, linear probe) of a run, student or exported artefact.\n\n"
         "Example: distillctl eval knn runs/quickstart --k 10,20,200",
    no_args_is_help=True,
)

TARGET = typer.Argument(..., help="Run directory, student/ directory, exported .onnx/.engine file, or teacher:<name|file>.")
DATA = typer.Option(None, "--data", help="Labelled train split (bank / probe training): ImageFolder dir or builtin:digits.")
VAL_DATA = typer.Option(None, "--val-data", help="Labelled evaluation split (default: the run's, or builtin test split).")
BATCH = typer.Option(256, "--batch-size", min=1, help="Images per forward pass.")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.")
WORKERS = typer.Option(None, "--num-workers", min=0,
                       help="DataLoader workers decoding images (default: 0 for in-memory data, else up to 8).")
CROP = typer.Option(None, "--crop-pct", help="Centre-crop fraction of the short side (default: the run's, else 0.875).")
CACHE = typer.Option(None, "--cache-dir", help="Feature cache directory (default: <run>/eval_cache for targets in a run).")
NO_CACHE = typer.Option(False, "--no-cache", help="Do not read or write cached embeddings.")
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout.")
INPUT_SIZE = typer.Option(None, "--input-size", min=8, help="Override the model's input size (recorded in the protocol).")
TEACHER_ARCH = typer.Option(None, "--teacher-arch", help="Architecture of a local teacher file (TARGET teacher:<file>).")
ACCEPT = typer.Option(False, "--accept-license", help="Accept a non-commercial/custom teacher licence.")


@dataclass
class _TeacherOptions:
    """Options that only matter for ``teacher:`` targets, plus the input-size override."""

    arch: str | None = None
    accept_license: bool = False
    input_size: int | None = None


@dataclass
class _Prepared:
    """Everything both commands need: the encoder, its preprocessing and the two labelled splits."""

    target: Path
    encoder: Any
    preprocess: dict
    description: str
    run_dir: Path | None
    train: Any
    val: Any
    train_spec: str
    val_spec: str
    crop_pct: float
    device: str
    cache: Any
    encoder_sha256: str | None


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} but no CUDA GPU is available", hint="use --device cpu or auto")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UsageError(f"unknown device '{name}'; valid: auto, cpu, cuda, cuda:N")
    return name


def _enclosing_run(target: Path, with_recipe: bool = False) -> Path | None:
    """The run directory a target belongs to: the run itself, ``<run>/student`` or ``<run>/export/<file>``.

    A run is a directory holding ``student/``; ``with_recipe`` also requires its ``recipe.yaml``
    (needed to know the run's data splits).
    """
    if str(target).startswith("teacher:"):
        return None
    candidates = [target, target.parent] if target.is_dir() else [target.parent.parent, target.parent]
    for candidate in candidates:
        if (candidate / "student").is_dir() and (not with_recipe or (candidate / "recipe.yaml").is_file()):
            return candidate
    return None


def _resolve_splits(target: Path, data: str | None, val_data: str | None) -> tuple[str, str, float | None]:
    """(train source, val source, the run's crop_pct or None): flags first, else the enclosing run's recipe."""
    from distillctl.data.datasets import resolve_splits

    run = _enclosing_run(target, with_recipe=True)
    run_train, run_val, run_crop = (None, None, None)
    if run is not None:
        from distillctl.rundir import RunDir

        run_train, run_val, run_crop = RunDir(run).eval_data()
    if data is None:
        if run is None:
            raise UsageError(f"no --data given and {target} is not inside a distillctl run directory",
                             hint="pass --data TRAIN [--val-data VAL] (an ImageFolder or builtin:digits)")
        train_spec, val_spec = run_train, val_data if val_data is not None else run_val
    else:
        train_spec, val_spec = resolve_splits(data, val_data)
    if val_spec is None:
        raise UsageError(f"no labelled evaluation split for {train_spec}",
                         hint="pass --val-data DIR, or use a DATA dir with train/ and val/ (or test/) inside")
    return train_spec, val_spec, run_crop


def _prepare(target_arg: str, data: str | None, val_data: str | None, device: str, crop_pct: float | None,
             cache_dir: str | None, no_cache: bool, teacher: _TeacherOptions) -> _Prepared:
    from distillctl.data.splits import open_splits
    from distillctl.eval.embedding_cache import EmbeddingCache
    from distillctl.eval.features import encoder_fingerprint, load_encoder

    from distillctl.train.distributed import launched_by_torchrun

    if launched_by_torchrun():
        # Stand-alone evaluation is cheap next to training; `distillctl run` shards its own eval across ranks.
        raise UsageError("distillctl eval runs in one process; launch it without torchrun",
                         hint="evaluation inside `distillctl run` is already split across ranks")
    is_teacher = target_arg.startswith("teacher:")
    target = Path(target_arg) if is_teacher else Path(target_arg).expanduser()
    device = _resolve_device(device)
    encoder, preprocess, description = load_encoder(target_arg if is_teacher else target, device,
                                                    teacher_arch=teacher.arch, accept_license=teacher.accept_license)
    if teacher.input_size is not None:
        preprocess = {**preprocess, "input_size": int(teacher.input_size)}
    if is_teacher and hasattr(encoder, "module"):  # a ViT teacher's position embeddings follow the input size
        from distillctl.resolution import adapt_to_size

        record = adapt_to_size(encoder.module, int(preprocess["input_size"]), description)
        if record is not None:
            console.print(f"{description}: position embeddings resampled {record['grid']} for "
                          f"{record['input_size']} px inputs", highlight=False)
    train_spec, val_spec, run_crop = _resolve_splits(target, data, val_data)
    splits = open_splits(train_spec, val_spec)  # builtin: its test split; folders: labels by train's class names
    train, val = splits.train, splits.test
    # Precedence: --crop-pct, the artefact's own metadata, the run's recipe, the 0.875 default.
    artefact_crop = getattr(encoder, "crop_pct", None)
    crop = next(float(c) for c in (crop_pct, artefact_crop, run_crop, 0.875) if c is not None)
    if not 0.0 < crop <= 1.0:
        raise UsageError(f"--crop-pct must be in (0, 1], got {crop}")
    run_dir = _enclosing_run(target)
    cache = None
    if not no_cache:
        root = Path(cache_dir).expanduser() if cache_dir else (run_dir / "eval_cache" if run_dir else None)
        cache = EmbeddingCache(root) if root is not None else None
    sha = encoder_fingerprint(target_arg if is_teacher else target, encoder) if cache is not None else None
    return _Prepared(target, encoder, preprocess, description, run_dir, train, val, train_spec, val_spec, crop,
                     device, cache, sha)


def _auto_workers(dataset: Any, requested: int | None) -> int:
    """Decoding files is the bottleneck on real data; in-memory arrays need no workers."""
    if requested is not None:
        return requested
    if getattr(dataset, "arrays", None) is not None:
        return 0
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def _embed_both(prep: _Prepared, batch_size: int, num_workers: int | None) -> tuple[tuple, tuple, dict]:
    from distillctl.eval.embedding_cache import embed_dataset_cached

    kwargs = dict(cache=prep.cache, encoder_sha256=prep.encoder_sha256, crop_pct=prep.crop_pct, batch_size=batch_size,
                  device=prep.device, **prep.preprocess)
    timing: dict[str, Any] = {}
    out = []
    for name, dataset in (("train", prep.train), ("val", prep.val)):
        console.print(f"[dim]embedding {name}: {len(dataset)} images ({prep.description})[/]", highlight=False)
        start = time.perf_counter()
        emb, labels, hit = embed_dataset_cached(prep.encoder, dataset, num_workers=_auto_workers(dataset, num_workers),
                                                **kwargs)
        timing[f"{name}_s"] = round(time.perf_counter() - start, 3)
        timing[f"{name}_cached"] = hit
        out.append((emb, labels))
    return out[0], out[1], timing


def _data_record(prep: _Prepared) -> dict:
    return {"train": prep.train_spec, "val": prep.val_spec, "n_train": len(prep.train), "n_val": len(prep.val),
            "train_manifest": prep.train.manifest_hash(), "val_manifest": prep.val.manifest_hash(),
            "num_classes": len(prep.train.classes)}


def _locks_run(command):
    """Hold the target's run-directory lock (runlock.py) for the whole command when it writes into the run: the
    result into ``summary.json`` (TARGET is the run) or embeddings into ``<run>/eval_cache``. Evaluating an
    artefact with ``--no-cache`` or ``--cache-dir`` elsewhere writes nothing there and takes no lock."""
    import contextlib
    import functools
    import inspect

    signature = inspect.signature(command)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        target = str(values["target"])
        run = None if target.startswith("teacher:") else _enclosing_run(Path(target).expanduser())
        caches = not values.get("no_cache", True) and values.get("cache_dir") is None
        writes = run is not None and (caches or Path(target).expanduser().resolve() == run.resolve())
        from distillctl.runlock import hold

        with hold(run, create=False) if writes else contextlib.nullcontext():
            return command(*args, **kwargs)

    return wrapper


def _merge_summary(prep: _Prepared, student_patch: dict) -> None:
    """Record the result in ``<run>/summary.json`` (atomic, other keys kept) when TARGET is the run itself."""
    if prep.run_dir is None or prep.target.resolve() != prep.run_dir.resolve():
        return
    from distillctl.rundir import RunDir

    RunDir(prep.run_dir).update_summary({"eval": {"student": student_patch}})
    console.print(f"[dim]recorded in {prep.run_dir / 'summary.json'}[/]", highlight=False)


def _parse_floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated numbers, got '{text}'") from None
    if not values:
        raise UsageError(f"{flag} needs at least one value")
    return values


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise UsageError(f"--k expects comma-separated positive integers, got '{text}'")
    return ks


def _knn_settings(prep: _Prepared, ks: tuple[int, ...] | None, temperature: float | None) -> tuple[tuple[int, ...], float]:
    """Flags win; otherwise a run's own recipe (so ``eval knn RUN`` repeats the run's protocol); else k=20, T=0.07."""
    if (ks is None or temperature is None) and prep.run_dir is not None and (prep.run_dir / "recipe.yaml").is_file():
        from distillctl.rundir import RunDir

        recipe_eval = RunDir(prep.run_dir).recipe().eval
        ks = ks or tuple(recipe_eval.knn_k)
        temperature = temperature if temperature is not None else recipe_eval.knn_temperature
    return ks or (20,), temperature if temperature is not None else 0.07


@_locks_run
def knn_report(target: str, data: str | None = None, val_data: str | None = None, k: str | None = None,
               temperature: float | None = None, batch_size: int = 256, device: str = "auto",
               num_workers: int | None = None, crop_pct: float | None = None, cache_dir: str | None = None,
               no_cache: bool = False, input_size: int | None = None, teacher_arch: str | None = None,
               accept_license: bool = False) -> tuple[dict, dict, "_Prepared"]:
    """``eval knn`` without the rendering: (the --json report, scores by k, the prepared target); records the
    result in the run's summary.json. Used by the CLI and by :func:`distillctl.evaluate`."""
    from distillctl.eval.features import eval_transform
    from distillctl.eval.knn import knn_evaluate, knn_protocol

    ks = _parse_ks(k) if k is not None else None
    if temperature is not None and temperature <= 0:
        raise UsageError(f"--t must be > 0, got {temperature}")
    prep = _prepare(target, data, val_data, device, crop_pct, cache_dir, no_cache,
                    _TeacherOptions(teacher_arch, accept_license, input_size))
    ks, temperature = _knn_settings(prep, ks, temperature)
    (train_emb, train_labels), (val_emb, val_labels), timing = _embed_both(prep, batch_size, num_workers)
    start = time.perf_counter()
    scores = knn_evaluate(train_emb, train_labels, val_emb, val_labels, ks=ks, temperature=temperature,
                          num_classes=len(prep.train.classes), device=prep.device)
    timing["knn_s"] = round(time.perf_counter() - start, 3)
    protocol = {**knn_protocol(ks, temperature), "bank": "train split", "bn": "eval",
                "transform": eval_transform(crop_pct=prep.crop_pct, **prep.preprocess)}
    knn_result = {str(key): round(value, 4) for key, value in sorted(scores.items())}
    _merge_summary(prep, {"knn": knn_result, "knn_protocol": protocol})
    result = {"target": str(prep.target), "encoder": prep.description, "knn": knn_result, "protocol": protocol,
              "data": _data_record(prep), "timing": timing, "embedding_dim": int(train_emb.shape[1])}
    return result, scores, prep


@app.command(help="Weighted kNN top-1 (cosine, exp(sim/T) votes) for several k in one pass.\n\n"
                  "Example: distillctl eval knn runs/quickstart --k 10,20,200\n\n"
                  "Example: distillctl eval knn runs/r/export/student.int8.onnx --data builtin:digits --json")
def knn(
    target: str = TARGET,
    data: Optional[str] = DATA,
    val_data: Optional[str] = VAL_DATA,
    k: Optional[str] = typer.Option(None, "--k", help="Comma-separated neighbour counts, e.g. 10,20,200 "
                                    "(default: the run's eval.knn_k, else 20)."),
    temperature: Optional[float] = typer.Option(None, "--t", "--temperature",
                                                help="Vote temperature T (default: the run's, else 0.07 as in DINO)."),
    batch_size: int = BATCH,
    device: str = DEVICE,
    num_workers: Optional[int] = WORKERS,
    crop_pct: Optional[float] = CROP,
    cache_dir: Optional[str] = CACHE,
    no_cache: bool = NO_CACHE,
    input_size: Optional[int] = INPUT_SIZE,
    teacher_arch: Optional[str] = TEACHER_ARCH,
    accept_license: bool = ACCEPT,
    json_output: bool = JSON,
) -> None:
    result, scores, prep = knn_report(target, data, val_data, k, temperature, batch_size, device, num_workers, crop_pct,
                                      cache_dir, no_cache, input_size, teacher_arch, accept_license)
    if json_output:
        print_json(result)
        return
    train_emb_shape = (len(prep.train), result["embedding_dim"])
    temperature = result["protocol"]["temperature"]
    table = Table(title="weighted kNN")
    table.add_column("k", justify="right")
    table.add_column("top-1 %", justify="right")
    for key, value in sorted(scores.items()):
        table.add_row(str(key), f"{value:.2f}")
    console.print(table)
    console.print(f"[dim]{prep.description}: T={temperature}, cosine, bank {train_emb_shape[0]} × {train_emb_shape[1]}-d "
                  f"({prep.train_spec}), queries {len(prep.val)} ({prep.val_spec})[/]", highlight=False)


@app.command(help="Linear probe: lr × weight-decay sweep selected on 10% of train, retrained, top-1 on val.\n\n"
                  "Example: distillctl eval linear runs/r50-mnv2 --data /data/train --val-data /data/val\n\n"
                  "Example: distillctl eval linear runs/quickstart --epochs 30 --json\n\n"
                  "Example: distillctl eval linear teacher:r50-moco --data /data/train --val-data /data/val")
@_locks_run
def linear(
    target: str = TARGET,
    data: Optional[str] = DATA,
    val_data: Optional[str] = VAL_DATA,
    epochs: int = typer.Option(50, "--epochs", min=1, help="SGD epochs per setting (sweep and final retrain)."),
    lrs: str = typer.Option("0.01,0.1,1.0", "--lrs", help="Learning rates swept (comma-separated)."),
    wds: str = typer.Option("0,1e-4,1e-3,1e-2", "--wds", help="Weight decays swept (comma-separated)."),
    probe_batch: int = typer.Option(256, "--probe-batch-size", min=1, help="Mini-batch size of the classifier."),
    heldout: float = typer.Option(0.1, "--heldout", help="Fraction of train held out (stratified) to pick lr/wd."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split and the mini-batch order."),
    batch_size: int = BATCH,
    device: str = DEVICE,
    num_workers: Optional[int] = WORKERS,
    crop_pct: Optional[float] = CROP,
    cache_dir: Optional[str] = CACHE,
    no_cache: bool = NO_CACHE,
    input_size: Optional[int] = INPUT_SIZE,
    teacher_arch: Optional[str] = TEACHER_ARCH,
    accept_license: bool = ACCEPT,
    json_output: bool = JSON,
) -> None:
    from distillctl.eval.features import eval_transform
    from distillctl.eval.linear import LinearProbeConfig, linear_probe_embeddings

    config = LinearProbeConfig(lrs=_parse_floats(lrs, "--lrs"), weight_decays=_parse_floats(wds, "--wds"),
                               epochs=epochs, batch_size=probe_batch, heldout_fraction=heldout, seed=seed)
    if not 0.0 < heldout < 1.0:
        raise UsageError(f"--heldout must be in (0, 1), got {heldout}")
    prep = _prepare(target, data, val_data, device, crop_pct, cache_dir, no_cache,
                    _TeacherOptions(teacher_arch, accept_license, input_size))
    (train_emb, train_labels), (val_emb, val_labels), timing = _embed_both(prep, batch_size, num_workers)
    start = time.perf_counter()
    result = linear_probe_embeddings(train_emb, train_labels, val_emb, val_labels, config,
                                     num_classes=len(prep.train.classes), device=prep.device)
    timing["probe_s"] = round(time.perf_counter() - start, 3)
    result.protocol["transform"] = eval_transform(crop_pct=prep.crop_pct, **prep.preprocess)
    result.protocol["bn"] = "eval"
    _merge_summary(prep, {"linear": result.to_dict()})
    if json_output:
        print_json({"target": str(prep.target), "encoder": prep.description, "linear": result.to_dict(),
                    "protocol": result.protocol, "data": _data_record(prep), "timing": timing})
        return
    table = Table(title="linear probe sweep")
    for column in ("lr", "weight decay", "held-out top-1 %", ""):
        table.add_column(column, justify="right")
    for row in result.sweep:
        chosen = row["lr"] == result.lr and row["weight_decay"] == result.weight_decay
        accuracy = "diverged" if row["diverged"] else f"{row['heldout_top1']:.2f}"
        table.add_row(f"{row['lr']:g}", f"{row['weight_decay']:g}", accuracy, "← chosen" if chosen else "")
    console.print(table)
    console.print(f"[bold]val top-1 {result.top1:.2f}%[/] · {prep.description} (lr {result.lr:g}, wd {result.weight_decay:g}, "
                  f"retrained on {len(prep.train)} train images, {epochs} epochs; val {len(prep.val)} images)",
                  highlight=False)



@app.command(help="Dense probe: per-location linear classifier on frozen feature maps over 2x2 mosaics of labelled "
                  "images (task mosaic-2x2, see README); mIoU and pixel accuracy.\n\n"
                  "Example: distillctl eval dense runs/quickstart\n\n"
                  "Example: distillctl eval dense teacher:dino-vits16 --data /data/train --val-data /data/val --json")
@_locks_run
def dense(
    target: str = TARGET,
    data: Optional[str] = DATA,
    val_data: Optional[str] = VAL_DATA,
    mosaics: int = typer.Option(1000, "--mosaics", min=2, help="Train mosaics (4 train images each)."),
    val_mosaics: int = typer.Option(500, "--val-mosaics", min=1, help="Evaluation mosaics (4 val images each)."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="SGD epochs per setting (sweep and final retrain)."),
    lrs: str = typer.Option("0.01,0.1,1.0", "--lrs", help="Learning rates swept (comma-separated)."),
    wds: str = typer.Option("0,1e-4,1e-3", "--wds", help="Weight decays swept (comma-separated)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the mosaics (train: seed, val: seed+1) and the SGD order."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Mosaics per forward pass."),
    device: str = DEVICE,
    crop_pct: Optional[float] = CROP,
    input_size: Optional[int] = INPUT_SIZE,
    teacher_arch: Optional[str] = TEACHER_ARCH,
    accept_license: bool = ACCEPT,
    json_output: bool = JSON,
) -> None:
    from distillctl.eval.dense import DenseProbeConfig, dense_probe

    config = DenseProbeConfig(train_mosaics=mosaics, val_mosaics=val_mosaics, lrs=_parse_floats(lrs, "--lrs"),
                              weight_decays=_parse_floats(wds, "--wds"), epochs=epochs, seed=seed)
    prep = _prepare(target, data, val_data, device, crop_pct, None, True,
                    _TeacherOptions(teacher_arch, accept_license, input_size))
    module = getattr(prep.encoder, "module", None)
    if module is None:
        raise UsageError(f"the dense probe needs the PyTorch model's feature maps; {prep.target} only gives embeddings",
                         hint="pass the run directory, its student/ directory or teacher:<name>")
    start = time.perf_counter()
    result = dense_probe(module, prep.train, prep.val, input_size=int(prep.preprocess["input_size"]),
                         mean=prep.preprocess["mean"], std=prep.preprocess["std"], crop_pct=prep.crop_pct,
                         batch_size=batch_size, device=prep.device, config=config)
    timing = {"probe_s": round(time.perf_counter() - start, 3)}
    _merge_summary(prep, {"dense": result.to_dict()})
    if json_output:
        print_json({"target": str(prep.target), "encoder": prep.description, "dense": result.to_dict(),
                    "protocol": result.protocol, "data": _data_record(prep), "timing": timing})
        return
    console.print(f"[bold]dense probe ({result.protocol['task']}): mIoU {result.miou:.2f}%, pixel accuracy "
                  f"{result.pixel_accuracy:.2f}%[/] · {prep.description} (feature grid "
                  f"{result.feature_grid[0]}x{result.feature_grid[1]}, lr {result.lr:g}, wd {result.weight_decay:g}; "
                  f"{config.train_mosaics} train / {config.val_mosaics} val mosaics)", highlight=False)
