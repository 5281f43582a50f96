"""``distillctl cache build|info|verify|knn|kmeans``: precompute teacher outputs once, inspect and check them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch
import typer
from rich.table import Table

from distillctl.cli_common import console, print_json
from distillctl.errors import GateError, UsageError

app = typer.Typer(
    help="Feature cache: run the teacher once over K stored views per image, replay them during distillation.\n\n"
         "Example: distillctl cache build --teacher r50-moco --data /data/train --views 5 --out /fast/cache",
    no_args_is_help=True,
)

JSON = typer.Option(False, "--json", help="Print one JSON object on stdout.")
CACHE_DIR = typer.Argument(..., help="Cache directory (the --out of `cache build`).")


def _floats(text: Optional[str], name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise UsageError(f"--{name} must be comma-separated numbers, e.g. 0.485,0.456,0.406") from exc
    if len(values) != 3:
        raise UsageError(f"--{name} needs 3 values (one per RGB channel); got {len(values)}")
    return values


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _human_bytes(num: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1000:
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1000
    return f"{num:.1f} TB"


def _render_info(info: dict[str, Any]) -> None:
    table = Table(title=f"feature cache {info['path']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    teacher = info["teacher"]
    transform = info["transform"]
    spec = transform["spec"]
    state = "complete" if info["complete"] else f"incomplete ({info['shards_sealed']}/{info['shards_total']} shards)"
    rows = [
        ("status", state),
        ("fingerprint", info["fingerprint"]),
        ("teacher", f"{teacher['name']} ({teacher['arch']}), sha256 {teacher['sha256'][:16]}…, BN {teacher['bn_mode']}"),
        ("outputs", ", ".join(f"{name} {dim}-d" for name, dim in info["outputs"].items()) + f" ({info['dtype']})"),
        *([("teacher taps", ", ".join(f"{tap} {'x'.join(str(v) for v in entry['shape'])} in {entry['dir']}/"
                                      for tap, entry in info["taps"].items()))] if info.get("taps") else []),
        ("views (K)", f"{info['views'] // info.get('turns', 1)} (view 0 = centre crop, 1..K-1 = {spec['family']}, "
                      f"seed {transform['seed']})"),
        *([("rotations", f"{info['turns']}: each view also stored at 1..{info['turns'] - 1} quarter turns "
                         f"({info['views']} rows per image)")] if info.get("turns", 1) > 1 else []),
        ("transform", f"{spec['size']} px, scale {spec['scale']}, crop_pct {spec['crop_pct']}, flip {spec['flip']}; "
                      f"mean {transform['mean']} std {transform['std']}"),
        ("replay", f"torchvision {transform['torchvision']}, {transform['interpolation']}; decoder {transform['decoder']}"),
        ("dataset", f"{info['dataset']['name']}: {info['dataset']['num_images']} images, "
                    f"manifest {info['dataset']['manifest_hash'][:16]}…"),
        ("size on disk", f"{_human_bytes(info['size_bytes'])} ({info['bytes_per_image']} B/image; "
                         f"{info['feature_bytes_per_image']} B/image of rows)"),
    ]
    build = info.get("build", {})
    if build.get("images_per_second"):
        rows.append(("last build", f"{build['images_per_second']} img/s on {build['device']} (amp {build['amp']})"))
    for field, value in rows:
        table.add_row(field, str(value))
    console.print(table)


def _run_lock(out: Path, distributed):  # noqa: ANN001, ANN202
    """A cache built inside a run directory (``--out <run>/cache``) holds that run's lock (runlock.py) on rank 0;
    a refusal is exit 2 on every rank. A cache directory of its own takes none."""
    import contextlib

    from distillctl.rundir import RunDir
    from distillctl.runlock import acquire

    run = Path(out).expanduser().absolute().parent
    if not RunDir(run).exists():
        return contextlib.nullcontext()
    return distributed.main_first(acquire, run, create=False) or contextlib.nullcontext()


@app.command(help="Run the teacher over K stored views of every image and write a sharded fp16 cache "
                  "(resumable: rerun the same command after an interruption).\n\n"
                  "Example: distillctl cache build --teacher r50-moco --data /data/train --views 5 --out /fast/cache")
def build(
    teacher: str = typer.Option(..., "--teacher", help="Registry name/alias, timm:<tag>, or a local weights file."),
    teacher_arch: Optional[str] = typer.Option(None, "--teacher-arch", help="Architecture of a local teacher file."),
    teacher_format: Optional[str] = typer.Option(None, "--teacher-format", help="Checkpoint format of a local file."),
    data: str = typer.Option(..., "--data", help="ImageFolder directory or builtin:digits."),
    views: int = typer.Option(5, "--views", min=1, help="Stored views per image (K); view 0 is the centre crop."),
    rotations: int = typer.Option(1, "--rotations", min=1, max=4,
                                  help="Also store each view rotated by 1..N-1 quarter turns (4 for dlkd, which shows "
                                       "every image at 0/90/180/270°); 1 = unrotated only."),
    out: Path = typer.Option(..., "--out", help="Cache directory."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=8, help="View size in pixels (default: the teacher's input size, usually 224)."),
    family: str = typer.Option("weak", "--family", help="Augmentation family of views 1..K-1: weak, mocov2, simclr, byol1, byol2, ssl-small."),
    scale: str = typer.Option("0.2,1.0", "--scale", help="RandomResizedCrop area range of views 1..K-1."),
    crop_pct: float = typer.Option(0.875, "--crop-pct", help="Centre-crop fraction of the short side (view 0)."),
    outputs: str = typer.Option("pooled", "--outputs", help="Teacher outputs to store: pooled, proj or pooled,proj."),
    taps: str = typer.Option("", "--taps", help="Teacher taps to store too, comma-separated (e.g. stage:-1, the last "
                                                "stage's map, which pcd and dense-reg read); none by default."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Views per teacher forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    amp: str = typer.Option("none", "--amp", help="none | bf16 | fp16 (autocast for the teacher)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Run the teacher in channels_last memory format."),
    seed: int = typer.Option(0, "--seed", help="Seed of the stored views (part of the fingerprint)."),
    shard_size: int = typer.Option(50000, "--shard-size", min=1, help="Images per shard."),
    num_workers: int = typer.Option(0, "--num-workers", min=0, help="DataLoader workers decoding and cropping images."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Normalisation mean (default: the teacher's)."),
    std: Optional[str] = typer.Option(None, "--std", help="Normalisation std (default: the teacher's)."),
    accept_license: bool = typer.Option(False, "--accept-license", help="Accept a non-commercial or custom teacher licence."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="Pin the teacher file's sha256."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress output."),
    json_output: bool = JSON,
) -> None:
    from distillctl.cache.build import build_cache
    from distillctl.data.datasets import open_dataset
    from distillctl.data.views import ViewSpec
    from distillctl.teachers.resolve import load_teacher

    wanted = {name.strip() for name in outputs.split(",") if name.strip()}
    scale_range = tuple(float(v) for v in scale.split(","))
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1] <= 1:
        raise UsageError(f"--scale must be two numbers 0 < lo <= hi <= 1, e.g. 0.2,1.0; got {scale}")
    from distillctl.train import distributed

    run_device = _device(device)
    distributed.init_from_env(torch.device(run_device).type)  # under torchrun: shards split across ranks
    run_device = distributed.local_device(run_device)
    loaded = load_teacher(teacher, teacher_arch, teacher_format, accept_license=accept_license, sha256=sha256,
                          device=run_device)
    dataset = open_dataset(data)
    try:
        spec = ViewSpec(size=image_size or loaded.preprocess.input_size, family=family, scale=scale_range,
                        crop_pct=crop_pct)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    from distillctl.resolution import adapt_teacher

    adapt_teacher(loaded, spec.size, lambda text: console.print(text, highlight=False))
    started = time.perf_counter()
    with _run_lock(out, distributed):
        cache = build_cache(loaded, dataset, out, spec=spec, views=views, outputs=wanted,
                            taps=[tap.strip() for tap in taps.split(",") if tap.strip()], turns=rotations,
                            mean=_floats(mean, "mean") or loaded.preprocess.mean,
                            std=_floats(std, "std") or loaded.preprocess.std, batch_size=batch_size,
                            device=run_device, amp=amp, channels_last=channels_last, seed=seed, shard_size=shard_size,
                            num_workers=num_workers, progress=not no_progress and not json_output)
    info = cache.info()
    info["wall_s"] = round(time.perf_counter() - started, 3)
    if json_output:
        print_json(info)
        return
    _render_info(info)


@app.command(help="Show a cache's teacher fingerprint, transform, dataset manifest, K, dims, size and completeness.\n\n"
                  "Example: distillctl cache info /fast/cache --json")
def info(path: Path = CACHE_DIR, json_output: bool = JSON) -> None:
    from distillctl.cache.store import cache_info, read_manifest

    data = cache_info(path.expanduser(), read_manifest(path))
    if json_output:
        print_json(data)
        return
    _render_info(data)


@app.command(help="Re-hash every shard and check values (finite, no all-zero rows, crop boxes inside the image); "
                  "with --teacher and --data also re-embed a random sample of stored views (cosine >= 0.999). "
                  "Exit 3 on any problem.\n\nExample: distillctl cache verify /fast/cache --teacher r50-moco --data /data/train")
def verify(
    path: Path = CACHE_DIR,
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Also spot-check replay drift against this teacher."),
    teacher_arch: Optional[str] = typer.Option(None, "--teacher-arch", help="Architecture of a local teacher file."),
    teacher_format: Optional[str] = typer.Option(None, "--teacher-format", help="Checkpoint format of a local file."),
    data: Optional[str] = typer.Option(None, "--data", help="The cached dataset (needed with --teacher)."),
    samples: int = typer.Option(64, "--samples", min=1, help="Stored views to re-embed for the drift check."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (drift check)."),
    accept_license: bool = typer.Option(False, "--accept-license", help="Accept a non-commercial or custom teacher licence."),
    json_output: bool = JSON,
) -> None:
    from distillctl.cache.store import FeatureCache, read_manifest, verify_store

    root = path.expanduser()
    report = verify_store(root, read_manifest(root))
    result = report.to_dict()
    if teacher is not None and report.ok:
        from distillctl.cache.drift import spot_check
        from distillctl.data.datasets import open_dataset
        from distillctl.teachers.resolve import load_teacher

        if data is None:
            raise UsageError("--teacher needs --data (the dataset the cache was built from)")
        run_device = _device(device)
        loaded = load_teacher(teacher, teacher_arch, teacher_format, accept_license=accept_license, device=run_device)
        try:
            result["spot_check"] = spot_check(FeatureCache.open(root), loaded, open_dataset(data), samples=samples,
                                              device=run_device)
        except GateError as exc:
            report.problems.append(exc.message)
            result = report.to_dict()
    if json_output:
        print_json(result)
    else:
        for problem in report.problems:
            console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
        for warning in report.warnings:
            console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
        if report.ok:
            drift = result.get("spot_check")
            extra = (f"; {drift['samples']} views re-embedded, min cosine "
                     + ", ".join(f"{k} {v:.5f}" for k, v in drift["min_cosine"].items())) if drift else ""
            console.print(f"cache {root}: OK ({report.shards_checked} shards, {_human_bytes(report.bytes_hashed)} "
                          f"hashed in {report.seconds:.2f} s{extra})", highlight=False)
    if not report.ok:
        raise GateError(f"cache {root} failed verification: {len(report.problems)} problem(s)",
                        hint="rebuild the cache: delete the directory (or use another --out) and rerun `distillctl cache build`")


@app.command(help="Teacher k-nearest-neighbour bags over the centre-crop embeddings (BINGO), stored beside the cache.\n\n"
                  "Example: distillctl cache knn /fast/cache --k 5")
def knn(path: Path = CACHE_DIR, k: int = typer.Option(5, "--k", min=1, help="Neighbours per image (self excluded)."),
        output: str = typer.Option("pooled", "--output", help="pooled or proj."),
        block: int = typer.Option(4096, "--block", min=1, help="Rows per similarity block (bounds memory)."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."), json_output: bool = JSON) -> None:
    from distillctl.cache.artifacts import knn_bags
    from distillctl.cache.store import FeatureCache

    cache = FeatureCache.open(path)
    started = time.perf_counter()
    bags = knn_bags(cache, k=k, output=output, block=block, device=_device(device))
    result = {"path": str(cache.path / "artifacts" / f"knn_{output}_k{k}.npy"), "shape": list(bags.shape),
              "seconds": round(time.perf_counter() - started, 3)}
    print_json(result) if json_output else console.print(f"kNN bags {result['shape']} → {result['path']}", highlight=False)


@app.command(help="Spherical k-means labels of the centre-crop embeddings (cluster transfer), stored beside the cache.\n\n"
                  "Example: distillctl cache kmeans /fast/cache --clusters 1000")
def kmeans(path: Path = CACHE_DIR, clusters: int = typer.Option(..., "--clusters", min=1, help="Number of clusters."),
           iters: int = typer.Option(20, "--iters", min=1, help="Lloyd iterations (stops early when stable)."),
           seed: int = typer.Option(0, "--seed", help="Seed of the initial centroids."),
           output: str = typer.Option("pooled", "--output", help="pooled or proj."),
           device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."), json_output: bool = JSON) -> None:
    import numpy as np

    from distillctl.cache.artifacts import kmeans_labels
    from distillctl.cache.store import FeatureCache

    cache = FeatureCache.open(path)
    started = time.perf_counter()
    labels = kmeans_labels(cache, clusters, iters, seed, output=output, device=_device(device))
    sizes = np.bincount(labels, minlength=clusters)
    result = {"path": str(cache.path / "artifacts" / f"kmeans_{output}_c{clusters}_s{seed}.npy"), "clusters": clusters,
              "smallest": int(sizes.min()), "largest": int(sizes.max()), "seconds": round(time.perf_counter() - started, 3)}
    if json_output:
        print_json(result)
    else:
        console.print(f"k-means labels ({clusters} clusters, sizes {result['smallest']}–{result['largest']}) → "
                      f"{result['path']}", highlight=False)
