"""Run every benchmark (or ``--only`` some), then regenerate benchmarks/RESULTS.md. Called by ``make bench``.

Order: cache (benchmarks/cache_bench.py, ResNet-50 → MobileNetV2 online vs cached), quality (every
registered method), export (latency + INT8 delta of the best quality student), speed (loop vs bare,
cache build, scaling), then render. Each script is resumable or cheap to rerun; extra arguments for
one script go through ``--quality-args`` / ``--speed-args`` / ``--export-args`` / ``--cache-args``.

Example: python benchmarks/run_all.py --only quality,export --quality-args "--budget-images 30000"
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, REPO, RESULTS, log, require_shared  # noqa: E402

# the full configuration: 120k images per cell (quality.py's default), curves of the best three
# methods up to 500k, and an SSL teacher pretrained by distillctl on the same data
QUALITY_DEFAULT = "--curve --ssl-teacher mocov2:resnet18:120000"
STEPS = ("cache", "quality", "export", "speed")
SCRIPTS = {"cache": "cache_bench.py", "quality": "quality.py", "export": "export_bench.py", "speed": "speed.py"}
# cache_bench.py on the benchmark data: ResNet-50-class teacher, MobileNetV2 student, 64 px
# (its own results/cache_bench.json belongs to the cache engineer's run: this one writes beside it)
CACHE_DEFAULT = ("--data benchmarks/work/train2k --images 512 --image-size 64 --views 2 --repeats 3 "
                 "--out benchmarks/results/cache_bench_cifar10.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: python benchmarks/run_all.py --only quality,export",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(STEPS), help=f"Comma-separated subset of {', '.join(STEPS)}.")
    parser.add_argument("--quick", action="store_true", help="Smoke configuration of every script (minutes, not hours).")
    parser.add_argument("--quality-args", default=QUALITY_DEFAULT,
                        help=f"Arguments for quality.py (default: the full configuration, '{QUALITY_DEFAULT}').")
    parser.add_argument("--speed-args", default="", help="Extra arguments for speed.py.")
    parser.add_argument("--export-args", default="", help="Extra arguments for export_bench.py.")
    parser.add_argument("--cache-args", default=CACHE_DEFAULT, help="Arguments for cache_bench.py.")
    parser.add_argument("--no-render", action="store_true", help="Do not regenerate RESULTS.md.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"error: unknown step(s) {', '.join(unknown)}; valid: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    require_shared()
    started = time.time()
    failures = []
    for step in STEPS:
        if step not in steps:
            continue
        extra = shlex.split(getattr(args, f"{step}_args"))
        if step == "cache":
            from common import make_subset

            make_subset("train", 200, "train2k")
            if args.quick:
                extra = ["--data", "benchmarks/work/train2k", "--images", "64", "--image-size", "32", "--views", "2",
                         "--repeats", "1", "--out", str(RESULTS / "cache_bench_quick.json")]
        elif args.quick:  # smoke: the script's --quick configuration (the full-run defaults are dropped)
            extra = ["--quick"] + ([] if step == "quality" and args.quality_args == QUALITY_DEFAULT else extra)
        command = [sys.executable, str(BENCH / SCRIPTS[step]), *extra]
        log(f"run_all: {' '.join(command)}")
        t0 = time.time()
        code = subprocess.call(command, cwd=REPO)
        log(f"run_all: {step} exited {code} after {time.time() - t0:.0f} s")
        if code != 0:
            failures.append(f"{step} (exit {code})")
    if not args.no_render:
        from render import render

        render(RESULTS, BENCH / "RESULTS.md")
        log(f"run_all: wrote {BENCH / 'RESULTS.md'}")
    log(f"run_all: done in {time.time() - started:.0f} s" + (f"; failed: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
