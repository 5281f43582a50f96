"""Shared helpers for the benchmark scripts: paths, the CIFAR-10 subsets, calling the real CLI,
machine/version description, statistics and atomic JSON writes.

Benchmarks read ``../shared`` (the CIFAR-10 JPEG tarball and the ResNet-18 teacher); a user's clone
does not have it, so every script calls :func:`require_shared` first and exits 2 with one clear line.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
WORK = Path(os.environ.get("DISTILLCTL_BENCH_WORK", BENCH / "work"))
RESULTS = Path(os.environ.get("DISTILLCTL_BENCH_RESULTS", BENCH / "results"))
SHARED = Path(os.environ.get("DISTILLCTL_SHARED", REPO.parent / "shared"))
TARBALL = SHARED / "data" / "cifar10-jpeg.tar.gz"
TEACHER = SHARED / "teachers" / "resnet18_cifar10_64px.safetensors"
TEACHER_JSON = SHARED / "teachers" / "resnet18_cifar10_64px.json"
CIFAR = WORK / "cifar10"


class BenchError(RuntimeError):
    """A benchmark step failed; the message is one line (the CLI's error line where there is one)."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


def run_script(main: Callable[[], int]) -> NoReturn:
    """A benchmark script's entry point: exit with ``main()``'s code, or 1 after the one-line error of a failed
    step (a :class:`BenchError`; anything else keeps its traceback)."""
    try:
        code = main()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    raise SystemExit(code)


def default_threads(jobs: int) -> int:
    """Threads per process when ``jobs`` processes share the machine's cores (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def require_shared(need_teacher: bool = True) -> None:
    """Exit 2 with a clear message when ../shared (data + teacher) is missing."""
    missing = [str(p) for p in ([TARBALL] + ([TEACHER, TEACHER_JSON] if need_teacher else [])) if not p.is_file()]
    if missing:
        print(f"error: benchmark inputs missing: {', '.join(missing)}\n"
              f"hint: benchmarks need the shared folder beside the checkout (../shared, or set DISTILLCTL_SHARED): "
              f"data/cifar10-jpeg.tar.gz and teachers/resnet18_cifar10_64px.safetensors + .json",
              file=sys.stderr)
        raise SystemExit(2)


# The protocol's class-balanced subsets (name → split, images per class) that RESULTS.md's commands read from
# benchmarks/work/; `python benchmarks/setup_data.py` makes them all once.
PROTOCOL_SUBSETS: dict[str, tuple[str, int]] = {
    "train10k": ("train", 1000),  # the quality table's training set and kNN bank
    "test2k": ("test", 200),  # its queries
    "train1k": ("train", 100),  # --quick, and the cache-build benchmark
    "test500": ("test", 50),  # --quick queries
}


def subset_path(name: str) -> Path:
    """Where a protocol subset lives (nothing is made: see :func:`make_subset`)."""
    return WORK / name


def subset_ready(name: str) -> bool:
    return (subset_path(name) / ".complete").is_file()


def protocol_subset(name: str) -> Path:
    """Make (once) and return one of :data:`PROTOCOL_SUBSETS`."""
    split, per_class = PROTOCOL_SUBSETS[name]
    return make_subset(split, per_class, name)


def teacher_preprocess() -> dict:
    """mean/std/arch of the shared CPU teacher, from its JSON card."""
    info = json.loads(TEACHER_JSON.read_text())
    return {"arch": info["arch"], "mean": [float(v) for v in info["mean"]], "std": [float(v) for v in info["std"]],
            "sha256": info.get("sha256"), "knn_top1_full": info.get("knn_top1", {}).get("value")}


def extract_cifar() -> Path:
    """Extract the tarball once into work/cifar10 (atomic: temp dir, then rename)."""
    if (CIFAR / "train").is_dir() and (CIFAR / "test").is_dir():
        return CIFAR
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-", dir=WORK))
    log(f"extracting {TARBALL} → {CIFAR}")
    with tarfile.open(TARBALL) as archive:
        archive.extractall(tmp, filter="data")
    if CIFAR.exists():
        shutil.rmtree(CIFAR)
    os.replace(tmp, CIFAR)
    return CIFAR


def make_subset(split: str, per_class: int, name: str, seed: int = 0) -> Path:
    """Deterministic class-balanced ImageFolder subset of symlinks: ``per_class`` images per class,
    chosen with ``random.Random(f"{seed}-{class}")`` from the sorted file list."""
    extract_cifar()
    out = WORK / name
    marker = out / ".complete"
    if marker.is_file():
        return out
    source = CIFAR / split
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=WORK))
    for cls in sorted(p.name for p in source.iterdir() if p.is_dir()):
        files = sorted(os.listdir(source / cls))
        if per_class > len(files):
            raise BenchError(f"{split}/{cls} has {len(files)} images, fewer than {per_class}")
        chosen = sorted(random.Random(f"{seed}-{cls}").sample(files, per_class))
        (tmp / cls).mkdir(parents=True)
        for file in chosen:
            os.symlink(os.path.abspath(source / cls / file), tmp / cls / file)
    (tmp / ".complete").write_text(f"{split} {per_class}/class seed {seed}\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def arch_parts(spec: str) -> tuple[str, dict]:
    """``vit_tiny_patch16_224(patch_size=8)`` → (timm name, constructor keywords): the ``--teacher-arch`` syntax of
    distillctl, so a benchmark student or teacher is named the same way everywhere."""
    from distillctl.teachers.archs import parse_arch

    parsed = parse_arch(spec)
    return parsed.name, dict(parsed.kwargs)


def arch_tag(spec: str) -> str:
    """A path-safe name of an architecture spec: ``vit_tiny_patch16_224-patch_size8`` (a plain name stays as it is)."""
    name, kwargs = arch_parts(spec) if "(" in spec else (spec, {})
    return name + "".join(f"-{key}{value}" for key, value in sorted(kwargs.items()))


def split_specs(text: str) -> list[str]:
    """Comma-separated architecture specs, commas inside a spec's parentheses kept:
    ``mobilenetv2_100,vit_tiny_patch16_224(patch_size=8, depth=2)`` → two specs."""
    specs, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            specs.append(current.strip())
            current = ""
        else:
            current += char
    specs.append(current.strip())
    return [spec for spec in specs if spec]


def student_sets(spec: str) -> list[str]:
    """``--set student.kwargs.KEY=VALUE`` arguments for the constructor keywords of ``spec`` (none for a plain name)."""
    if "(" not in spec:
        return []
    return [item for key, value in sorted(arch_parts(spec)[1].items())
            for item in ("--set", f"student.kwargs.{key}={value}")]


def random_student(student: str, image_size: int, seed: int, pre: dict) -> Path:
    """The random-init reference student (the floor every method must beat), saved once as a student folder that
    ``distillctl eval`` reads: ``work/quality/reference/random-<student>``; seeded, so every machine makes the same.
    ``student`` may carry constructor keywords (``vit_tiny_patch16_224(patch_size=8)``), recorded as the runs do.
    The input size is part of the student (its config, a ViT's grid): sizes other than the protocol's 64 px get their
    own folder (``random-<student>-32px``), so a --quick run never evaluates the 64 px one."""
    suffix = "" if int(image_size) == 64 else f"-{int(image_size)}px"
    out = WORK / "quality" / "reference" / f"random-{arch_tag(student)}{suffix}"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import save_file

    from distillctl.resolution import student_model_kwargs
    from distillctl.students import StudentConfig, create_backbone, feature_dim

    name, extra = arch_parts(student) if "(" in student else (student, {})
    model_kwargs = student_model_kwargs(name, image_size, extra=extra) if extra else None
    torch.manual_seed(seed)
    model = create_backbone(name, img_size=image_size, model_kwargs=model_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    config = StudentConfig(arch=name, num_features=feature_dim(model), input_size=[3, image_size, image_size],
                           mean=pre["mean"], std=pre["std"], teacher={}, method="random-init",
                           model_kwargs=model_kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(config.to_json())
    return out


def rel(path: Path | str) -> str:
    """A path as the CLI is given it: relative to the repository (the subprocess cwd) when inside it.
    Dataset names (and so manifest hashes and cache fingerprints) include this string."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def standard_data(make: bool = True) -> dict[str, str]:
    """The quality benchmark's subsets: 10k train images (1000/class), 2k test images (200/class); with
    ``make=False`` only their paths (a dry run must not unpack or build anything)."""
    if not make:
        return {"train": rel(subset_path("train10k")), "test": rel(subset_path("test2k"))}
    return {"train": rel(protocol_subset("train10k")), "test": rel(protocol_subset("test2k"))}


def python_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def distillctl(args: list[str], log_path: Path | None = None, json_out: bool = True, timeout: float | None = None,
               threads: int | None = None) -> dict | str:
    """Run ``python -m distillctl ARGS [--json]``; stderr goes to ``log_path``; returns the parsed JSON."""
    command = [sys.executable, "-m", "distillctl", *args] + (["--json"] if json_out else [])
    log_handle = open(log_path, "a", encoding="utf-8") if log_path else subprocess.DEVNULL
    # stdout goes to an (unlinked) temp file, not a pipe: a suite process killed mid-cell leaves its cells running
    # (a later suite invocation waits for them), and a pipe with no reader would kill them at their first write.
    out_handle = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
    try:
        if log_path:
            log_handle.write(f"$ {' '.join(command)}\n")
            log_handle.flush()
        proc = subprocess.run(command, stdout=out_handle, stderr=log_handle, text=True, cwd=REPO,
                              env=python_env(threads), timeout=timeout)
        out_handle.seek(0)
        stdout = out_handle.read()
    finally:
        out_handle.close()
        if log_path:
            log_handle.close()
    if proc.returncode != 0:
        last = ""
        if log_path and log_path.is_file():
            lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("error:")]
            last = (errors or lines or [""])[-1]
        raise BenchError(f"distillctl {args[0]} exited {proc.returncode}: {last}", proc.returncode)
    if not json_out:
        return stdout
    try:
        return json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise BenchError(f"distillctl {args[0]} printed no JSON ({exc})") from None


def display_command(args: list[str]) -> str:
    """The command as a user would type it (repo-relative paths, ../shared for the shared folder)."""
    text = " ".join(_quote(a) for a in args)
    text = text.replace(str(SHARED), "../shared").replace(str(REPO) + "/", "")
    return text


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " []*?()") else arg


def registered_methods() -> list[dict]:
    """Whatever ``distillctl methods list --json`` reports right now (name, kind, teacher_mode)."""
    return list(distillctl(["methods", "list"])["methods"])


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict:
    """CPU model, cores, RAM, load, OS and library versions, git commit and date (UTC)."""
    model = ""
    for line in _cmd(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for module in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "numpy", "distillctl"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing optional module is just not listed
            versions[module] = None
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return {"cpu_model": model or platform.processor(), "cores": os.cpu_count(), "ram_gib": mem_gib, "gpu": gpu,
            "load_average": [round(v, 2) for v in os.getloadavg()], "platform": platform.platform(),
            "versions": versions, "git_commit": _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def spread(values: Iterable[float]) -> dict:
    """Median with min/max and n (the spread shown next to every timing)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temp file in the same directory, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are shared files
    os.replace(tmp, path)


def metrics_rates(run_dir: Path, skip_first: int = 1) -> list[float]:
    """Per-window img/s from a run's metrics.jsonl (the first window holds warm-up and is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    rates = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "img_per_s" in record:
                rates.append(float(record["img_per_s"]))
    return rates[skip_first:] if len(rates) > skip_first else rates
