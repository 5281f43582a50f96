"""Speed and cost benchmark of the real training loop on the CIFAR-10 subsets (64 px, MobileNetV2).

Parts (``--parts``, default all):

- ``loop``: img/s of ``distillctl run`` (median over log windows after the first) per method, cached and
  online teacher, vs a bare PyTorch loop doing only the student's forward, backward and SGD step on the
  same image batches (pre-decoded views in memory: the practical limit). Interleaved repeats; ratios
  are taken within a repeat. Peak RSS of each distill process (wait4 rusage).
- ``cache``: ``distillctl cache build`` img/s, bytes per image and peak RSS for K = 1, 2, 4 views, and
  cached epoch time vs K.
- ``scaling``: time of one full epoch (distill stage) vs dataset size (default 2k, 8k, 32k images).

Writes benchmarks/results/speed.json. The ResNet-50 → MobileNetV2 online/cached ratio comes from
benchmarks/cache_bench.py (results/cache_bench.json, run by run_all.py).

Example: python benchmarks/speed.py --parts loop --methods simreg,seed --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (REPO, RESULTS, TEACHER, WORK, BenchError, display_command, log, machine_info,  # noqa: E402
                    make_subset, metrics_rates, python_env, read_json, registered_methods, rel, require_shared,
                    spread, standard_data, teacher_preprocess, write_json)

PARTS = ("loop", "cache", "scaling")
THREADS = {"n": None}  # --threads, shared by the bare loop and the distillctl subprocesses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: python benchmarks/speed.py --parts loop --methods simreg,seed "
                                            "--steps 30 --repeats 3",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"Comma-separated subset of {', '.join(PARTS)}.")
    parser.add_argument("--methods", default="all", help="Distillation methods for the loop part ('all' = registered).")
    parser.add_argument("--modes", default="cached,online", help="Teacher modes measured per method.")
    parser.add_argument("--student", default="mobilenetv2_100", help="timm student.")
    parser.add_argument("--image-size", type=int, default=64, help="Input resolution.")
    parser.add_argument("--batch-size", type=int, default=64, help="Global batch.")
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per timed distill run.")
    parser.add_argument("--log-every", type=int, default=5, help="Steps per img/s window.")
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved repeats (medians and spread over them).")
    parser.add_argument("--bare-steps", type=int, default=10, help="Timed steps of the bare loop before each distill run.")
    parser.add_argument("--cache-views", type=int, default=4, help="Stored views for the loop part's caches.")
    parser.add_argument("--views-list", default="1,2,4", help="K values for the cache part.")
    parser.add_argument("--cache-images", type=int, default=2000, help="Images for the cache part (balanced subset).")
    parser.add_argument("--sizes", default="2000,8000,32000", help="Dataset sizes for the scaling part.")
    parser.add_argument("--scaling-method", default="simreg", help="Method of the scaling part.")
    parser.add_argument("--scaling-mode", default="online", help="Teacher mode of the scaling part (online: no cache).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OMP threads for the bare loop and every distillctl process (default: all cores).")
    parser.add_argument("--quick", action="store_true", help="Tiny smoke configuration (32 px, few steps, small sets).")
    parser.add_argument("--out", default=None, help="Result JSON (default results/speed.json).")
    return parser.parse_args(argv)


# --- measured subprocesses ------------------------------------------------------------------------

def run_measured(args: list[str], log_path: Path) -> tuple[str, float, float]:
    """Run ``python -m distillctl ARGS --json``; returns (stdout, wall seconds, peak RSS MiB of that child)."""
    command = [sys.executable, "-m", "distillctl", *args, "--json"]
    with open(log_path, "a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=handle, text=True, cwd=REPO,
                                env=python_env(THREADS["n"]))
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith("error:")]
        raise BenchError(f"distillctl {args[0]} exited {proc.returncode}: {lines[-1] if lines else ''}")
    return stdout, wall, usage.ru_maxrss / 1024.0  # Linux: KiB


def teacher_sets(pre: dict) -> list[str]:
    mean = ",".join(f"{v:g}" for v in pre["mean"])
    std = ",".join(f"{v:g}" for v in pre["std"])
    return ["--set", "data.crop_pct=1.0", "--set", f"data.mean=[{mean}]", "--set", f"data.std=[{std}]"]


def distill_command(args, pre, method: str, mode: str, data: str, out: Path, steps: int, cache: Path | None,
                    epochs: int = 1) -> list[str]:
    command = ["run", "--method", method, "--teacher", str(TEACHER), "--teacher-arch", pre["arch"], "--student",
               args.student, "--data", data, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--epochs", str(epochs), "--seed", "0", "--teacher-mode", mode, "--cache-views", str(args.cache_views),
               "--out", str(out), "--set", f"train.max_steps={steps}", "--set", f"train.log_every={args.log_every}",
               "--set", "export.enabled=false", "--set", "train.checkpoint_every_minutes=1000", *teacher_sets(pre)]
    if cache is not None:
        command += ["--cache", str(cache)]
    return command


# --- bare loop ------------------------------------------------------------------------------------

def bare_batches(data: str, args, count: int) -> list:
    """``count`` batches of random-resized-crop views of the training images, decoded once (uint8)."""
    import numpy as np
    import torch

    from distillctl.data.datasets import open_dataset
    from distillctl.data.views import ViewSpec, apply_view_uint8, sample_view

    dataset = open_dataset(Path(REPO / data) if not Path(data).is_absolute() else data)
    spec = ViewSpec(size=args.image_size, family="weak")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(dataset))
    batches = []
    for b in range(count):
        views = []
        for i in order[b * args.batch_size:(b + 1) * args.batch_size]:
            image = dataset.load_image(int(i))
            params = sample_view(spec, image.shape[1], image.shape[2], rng)
            views.append(apply_view_uint8(image, params, spec))
        batches.append(torch.stack(views))
    return batches


def bare_loop(batches: list, args, pre: dict, steps: int) -> dict:
    """Student forward + backward + SGD step only; img/s per window of ``--log-every`` steps."""
    import timm
    import torch

    from distillctl.data.views import normalize

    torch.manual_seed(0)
    student = timm.create_model(args.student, pretrained=False, num_classes=0).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    rates, window_start, window_images = [], time.perf_counter(), 0
    for step in range(steps + args.log_every):  # the first window is warm-up, as for the distill loop
        images = normalize(batches[step % len(batches)], pre["mean"], pre["std"])
        loss = student(images).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window_images += images.shape[0]
        if (step + 1) % args.log_every == 0:
            now = time.perf_counter()
            rates.append(window_images / (now - window_start))
            window_start, window_images = now, 0
    return {"rates": [round(r, 2) for r in rates[1:]], "images_per_sec": round(statistics.median(rates[1:]), 2),
            "threads": torch.get_num_threads()}


# --- parts ----------------------------------------------------------------------------------------

def loop_part(args, pre, data, methods: list[dict], log_path: Path) -> dict:
    from quality import cache_dir_for  # the same cache directories as the quality suite

    from distillctl.methods.base import TeacherDims

    wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
    runnable = [m for m in methods if m["kind"] == "distill" and not m["teacher_mode"].startswith("?")]
    if args.methods != "all":
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        runnable = [m for m in runnable if m["name"] in names]
    cells = []
    for m in runnable:
        for mode in wanted:
            if mode == "cached" and m["teacher_mode"] == "online":
                continue
            cells.append((m["name"], mode))
    batches = bare_batches(data["train"], args, count=8)
    results: dict = {"bare": [], "cells": {f"{n}/{mode}": [] for n, mode in cells}, "commands": {}}
    cache_args = argparse.Namespace(image_size=args.image_size, cache_views=args.cache_views, seed=0)
    for repeat in range(args.repeats):
        for name, mode in (cells if repeat % 2 == 0 else cells[::-1]):
            cache = cache_dir_for(name, "sup", TeacherDims(512, None), args.student, cache_args) if mode == "cached" else None
            if cache is not None and not (read_json(cache / "manifest.json") or {}).get("complete"):
                # never build (or race another process building) a cache inside a timed run
                results["cells"][f"{name}/{mode}"].append({"error": f"cache {rel(cache)} not built yet (run quality.py)"})
                continue
            # the bare loop right before each distill run: on a shared machine load drifts within minutes
            bare = bare_loop(batches, args, pre, args.bare_steps)
            results["bare"].append(bare)
            log(f"repeat {repeat + 1}: bare loop {bare['images_per_sec']} img/s")
            out = WORK / "speed" / "loop" / f"{name}-{mode}-r{repeat}"
            if out.exists():  # a fresh run directory: metrics.jsonl of an earlier invocation must not be read
                shutil.rmtree(out)
            command = distill_command(args, pre, name, mode, data["train"], out, args.steps, cache,
                                      epochs=max(1, -(-args.steps * args.batch_size // data["train_images"])))
            results["commands"][f"{name}/{mode}"] = "distillctl " + display_command(command)
            try:
                stdout, wall, rss = run_measured(command + ["--restart"], log_path)
            except BenchError as exc:
                log(f"{name}/{mode} failed: {exc}")
                results["cells"][f"{name}/{mode}"].append({"error": str(exc)})
                continue
            rates = metrics_rates(out)
            rate = statistics.median(rates) if rates else None
            results["cells"][f"{name}/{mode}"].append({"images_per_sec": round(rate, 2) if rate else None,
                                                       "rates": rates, "process_wall_s": round(wall, 2),
                                                       "peak_rss_mib": round(rss, 1),
                                                       "bare_images_per_sec": bare["images_per_sec"],
                                                       "ratio_loop_over_bare": round(rate / bare["images_per_sec"], 3)
                                                       if rate else None})
            log(f"  {name}/{mode}: {rate and round(rate, 1)} img/s, peak RSS {rss:.0f} MiB")
    summary = {}
    for key, runs in results["cells"].items():
        good = [r for r in runs if r.get("images_per_sec")]
        summary[key] = {"images_per_sec": spread(r["images_per_sec"] for r in good),
                        "ratio_loop_over_bare": spread(r["ratio_loop_over_bare"] for r in good),
                        "peak_rss_mib": spread(r["peak_rss_mib"] for r in good),
                        "errors": [r["error"] for r in runs if "error" in r]}
    for name in {key.split("/")[0] for key in summary}:
        online, cached = results["cells"].get(f"{name}/online", []), results["cells"].get(f"{name}/cached", [])
        ratios = [c["images_per_sec"] / o["images_per_sec"] for o, c in zip(online, cached)
                  if o.get("images_per_sec") and c.get("images_per_sec")]
        if ratios:  # epoch time online / cached = (img/s cached) / (img/s online), pairwise within a repeat
            summary[f"{name}/online_over_cached"] = {"epoch_time_ratio": spread(ratios)}
    results["bare_summary"] = spread(b["images_per_sec"] for b in results["bare"])
    results["summary"] = summary
    return results


def cache_part(args, pre, log_path: Path) -> dict:
    data = rel(make_subset("train", args.cache_images // 10, f"train{args.cache_images // 1000}k"))
    out: dict = {"images": args.cache_images, "data": data, "builds": {}, "epochs": {}}
    mean = ",".join(f"{v:g}" for v in pre["mean"])
    std = ",".join(f"{v:g}" for v in pre["std"])
    for views in [int(v) for v in args.views_list.split(",")]:
        cache = WORK / "speed" / "cache" / f"k{views}"
        if cache.exists():
            shutil.rmtree(cache)
        command = ["cache", "build", "--teacher", str(TEACHER), "--teacher-arch", pre["arch"], "--data", data,
                   "--views", str(views), "--out", str(cache), "--image-size", str(args.image_size), "--crop-pct", "1.0",
                   "--mean", mean, "--std", std, "--batch-size", "256"]
        import json

        stdout, wall, rss = run_measured(command, log_path)
        info = json.loads(stdout)
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        out["builds"][str(views)] = {"wall_s": round(wall, 2), "images_per_sec": round(args.cache_images / info["wall_s"], 2),
                                     "views_per_sec": round(args.cache_images * views / info["wall_s"], 2),
                                     "build_s": info["wall_s"], "bytes_on_disk": size,
                                     "bytes_per_image": round(size / args.cache_images, 1),
                                     "feature_bytes_per_image": info.get("bytes_per_image"),
                                     "peak_rss_mib": round(rss, 1),
                                     "command": "distillctl " + display_command(command)}
        log(f"cache K={views}: {out['builds'][str(views)]['images_per_sec']} img/s, "
            f"{out['builds'][str(views)]['bytes_per_image']} B/image, peak {rss:.0f} MiB")
    return out


def scaling_part(args, pre, log_path: Path) -> dict:
    import json

    out: dict = {"method": args.scaling_method, "mode": args.scaling_mode, "sizes": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        data = rel(make_subset("train", size // 10, f"train{size}"))
        steps = size // args.batch_size
        run = WORK / "speed" / "scaling" / f"n{size}"
        command = distill_command(args, pre, args.scaling_method, args.scaling_mode, data, run, steps,
                                  None if args.scaling_mode == "online" else run.parent / f"cache-n{size}")
        stdout, wall, rss = run_measured(command + ["--restart"], log_path)
        summary = json.loads(stdout)
        train = summary.get("train", {})
        out["sizes"][str(size)] = {"epoch_s": train.get("wall_s"), "images_per_sec": train.get("images_per_sec"),
                                   "steps": train.get("steps"), "process_wall_s": round(wall, 2),
                                   "peak_rss_mib": round(rss, 1), "command": "distillctl " + display_command(command)}
        log(f"scaling n={size}: epoch {train.get('wall_s')} s ({train.get('images_per_sec')} img/s)")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_shared()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"error: unknown part(s) {', '.join(unknown)}; valid: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if args.quick:
        args.image_size, args.batch_size, args.steps, args.repeats, args.bare_steps = 32, 16, 6, 1, 4
        args.log_every, args.views_list, args.cache_images, args.sizes = 2, "1,2", 200, "200,400"
        args.methods = "simreg" if args.methods == "all" else args.methods
    started = time.time()
    if args.threads:
        import torch

        THREADS["n"] = args.threads
        torch.set_num_threads(args.threads)
    pre = teacher_preprocess()
    if args.quick:
        args.cache_views = 2
        data = {"train": rel(make_subset("train", 100, "train1k")), "train_images": 1000}
    else:
        data = {**standard_data(), "train_images": 10_000}
    out_path = Path(args.out) if args.out else RESULTS / ("speed_quick.json" if args.quick else "speed.json")
    result = read_json(out_path) or {}
    result.update({"benchmark": "speed", "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "machine": machine_info(), "config": {k: v for k, v in vars(args).items() if k != "out"}})
    (WORK / "speed").mkdir(parents=True, exist_ok=True)
    log_path = WORK / "speed" / "speed.log"
    methods = registered_methods()
    for part in parts:
        t0 = time.time()
        try:
            if part == "loop":
                result["loop"] = loop_part(args, pre, data, methods, log_path)
            elif part == "cache":
                result["cache"] = cache_part(args, pre, log_path)
            elif part == "scaling":
                result["scaling"] = scaling_part(args, pre, log_path)
        except BenchError as exc:
            result[part] = {"error": str(exc)}
            log(f"{part} failed: {exc}")
        result.setdefault("part_seconds", {})[part] = round(time.time() - t0, 1)
        # parts may come from different invocations (e.g. the loop re-measured on a quiet machine): each keeps
        # the command, configuration and load it was measured under
        result.setdefault("part_runs", {})[part] = {
            "command": result["command"], "config": result["config"], "seconds": result["part_seconds"][part],
            "load_average": result["machine"].get("load_average"),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(out_path, result)
    result["elapsed_s"] = round(time.time() - started, 1)
    write_json(out_path, result)
    log(f"speed benchmark done in {result['elapsed_s']:.0f} s → {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
