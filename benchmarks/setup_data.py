"""One-time set-up for the benchmarks: unpack the CIFAR-10 JPEG tarball from ../shared and build the protocol's
class-balanced subsets in benchmarks/work/ (train10k, test2k, train1k, test500) and the seeded random-init
reference student that the commands in benchmarks/RESULTS.md read. Idempotent: finished subsets are kept; an interrupted run is redone cleanly (each
subset is built in a temporary folder and renamed into place).

Example: python benchmarks/setup_data.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (PROTOCOL_SUBSETS, SHARED, TARBALL, TEACHER, WORK, log, protocol_subset,  # noqa: E402
                    random_student, rel, require_shared, run_script, split_specs, subset_ready, teacher_preprocess)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: python benchmarks/setup_data.py",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subsets", default=",".join(PROTOCOL_SUBSETS),
                        help=f"Comma-separated subsets to build (default: all of {', '.join(PROTOCOL_SUBSETS)}).")
    parser.add_argument("--random-students", default="mobilenetv2_100",
                        help="Random-init reference students to save (comma-separated timm names, with constructor "
                             "keywords as in vit_tiny_patch16_224(patch_size=8); 'none'; default mobilenetv2_100): the "
                             "floor rows' `distillctl eval` commands read them.")
    parser.add_argument("--image-size", type=int, default=64, help="Input size of those students (default 64).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of those students (default 0).")
    parser.add_argument("--check", action="store_true", help="Build nothing: say which subsets are ready (exit 1 if any "
                                                             "is missing).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.subsets.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROTOCOL_SUBSETS]
    if unknown:
        print(f"error: unknown subset(s) {', '.join(unknown)}; known: {', '.join(PROTOCOL_SUBSETS)}", file=sys.stderr)
        return 2
    if args.check:
        missing = [n for n in names if not subset_ready(n)]
        for name in names:
            print(f"{name}: {'ready' if name not in missing else 'missing'} ({rel(WORK / name)})")
        return 1 if missing else 0
    require_shared()  # exit 2 naming what is missing from ../shared
    log(f"shared inputs: {TARBALL} and {TEACHER} (shared folder {SHARED})")
    for name in names:
        split, per_class = PROTOCOL_SUBSETS[name]
        already = subset_ready(name)
        path = protocol_subset(name)
        log(f"{name}: {'already there' if already else 'built'}: {rel(path)} ({per_class} {split} images per class)")
    students = [s for s in split_specs(args.random_students) if s != "none"]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # distillctl from this checkout
    for student in students:
        log(f"random-init {student}: {rel(random_student(student, args.image_size, args.seed, teacher_preprocess()))}")
    print(f"benchmark data ready in {rel(WORK)}: {', '.join(names + [f'random-{s}' for s in students])}")
    return 0


if __name__ == "__main__":
    run_script(main)
