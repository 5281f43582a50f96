"""GPU check: ResNet-50 → MobileNetV2 distillation step at 224 px (bf16 autocast, channels_last,
torch.compile) from synthetic on-GPU tensors and from a feature cache, the cache build, ONNX
Runtime CUDA inference, the data loader's img/s (JPEG decode + random-resized-crop view, the
training views' CPU path) and the img/s of distillctl's real cached training loop (``distillctl
run`` on the same JPEGs: cache build, then SimReg from the cache, bf16 + channels_last). Loader
img/s below the loop's student-step img/s means decoding does not keep up. Prints ONE JSON line on
stdout and writes it to ``--out``.

The cache build and replay use distillctl's own ``build_cache`` / ``FeatureCache`` (synthetic uint8
images in memory); the distillation step is a SimReg-style cosine regression through a 2048-d MLP head.
ONNX Runtime CUDA needs onnxruntime-gpu on the machine; without it the JSON says so. Random-init
weights: only speed is measured. Targets: shared/docs/export_cache_data.md §C.3 (e.g. MobileNetV2
train step ≥ 5 k img/s "healthy" on 1×H100).

Example: python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json")
    parser.add_argument("--batch-size", type=int, default=256, help="Training batch (default 256).")
    parser.add_argument("--image-size", type=int, default=224, help="Resolution (default 224).")
    parser.add_argument("--steps", type=int, default=30, help="Timed steps per mode (after warm-up).")
    parser.add_argument("--warmup", type=int, default=10, help="Untimed steps (compilation happens here).")
    parser.add_argument("--cache-images", type=int, default=4096, help="Synthetic images for the cache build/replay.")
    parser.add_argument("--views", type=int, default=2, help="Stored views per image.")
    parser.add_argument("--no-compile", action="store_true", help="Skip torch.compile (eager).")
    parser.add_argument("--skip-onnx", action="store_true", help="Skip the ONNX Runtime CUDA part.")
    parser.add_argument("--allow-cpu", action="store_true", help="Run on CPU (a smoke test of the script only).")
    parser.add_argument("--parts", default="step,cache,onnx,loader,loop",
                        help="Comma-separated parts: step (synthetic steps), cache (build + lookup step), onnx "
                             "(ONNX Runtime CUDA), loader (data loader img/s), loop (distillctl's cached training loop).")
    parser.add_argument("--loop-images", type=int, default=2048, help="Synthetic JPEGs for the loader and loop parts.")
    parser.add_argument("--loop-steps", type=int, default=40, help="Training steps of the cached-loop run.")
    parser.add_argument("--workers", type=int, default=None, help="Data loader workers (default: min(16, cores)).")
    parser.add_argument("--out", default=None, help="Also write the JSON here.")
    return parser.parse_args(argv)


def timed(step, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import timm
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(json.dumps({"error": "no CUDA GPU visible (torch.cuda.is_available() is False)"}))
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    B, S = args.batch_size, args.image_size
    result: dict = {"gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                    "batch_size": B, "image_size": S, "compile": not args.no_compile,
                    "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    unknown = parts - {"step", "cache", "onnx", "loader", "loop"}
    if unknown:
        print(json.dumps({"error": f"unknown --parts {sorted(unknown)}"}))
        return 2
    result["parts"] = sorted(parts)
    if parts & {"loader", "loop"}:
        result.update(loader_and_loop(args, parts, cuda))
        _save(result, args.out)  # a later part that runs out of time still leaves these numbers
    if not parts & {"step", "cache", "onnx"}:
        return _emit(result, args.out)

    teacher = timm.create_model("resnet50", pretrained=False, num_classes=0).to(device).eval()
    teacher = teacher.to(memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0).to(device).train()
    student = student.to(memory_format=torch.channels_last)
    head = torch.nn.Sequential(torch.nn.Linear(student.num_features, 2048), torch.nn.BatchNorm1d(2048),
                               torch.nn.ReLU(), torch.nn.Linear(2048, 2048)).to(device)
    params = list(student.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    fwd_student = student if args.no_compile else torch.compile(student)
    fwd_teacher = teacher if args.no_compile else torch.compile(teacher)
    images = torch.randn(B, 3, S, S, device=device).contiguous(memory_format=torch.channels_last)

    def loss_step(target: torch.Tensor, batch: torch.Tensor) -> None:
        with amp:
            pred = head(fwd_student(batch))
            loss = 2 - 2 * torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def online_step() -> None:  # SimReg-style step with the teacher online
        with torch.no_grad(), amp:
            target = fwd_teacher(images)
        loss_step(target, images)

    fixed = torch.randn(B, 2048, device=device)

    def student_step() -> None:  # student only: the upper bound of a cached step
        loss_step(fixed, images)

    def teacher_step() -> None:
        with torch.no_grad(), amp:
            fwd_teacher(images)

    for name, step in (("student_step", student_step), ("online_distill_step", online_step),
                       ("teacher_inference", teacher_step)):
        if "step" not in parts:
            break
        seconds = timed(step, args.steps, args.warmup, sync)
        result[f"{name}_img_s"] = round(B * args.steps / seconds, 1)
    if cuda:
        result["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if "cache" not in parts:
        if "onnx" in parts:
            result.update(onnx_cuda(student, S, device))
        return _emit(result, args.out)

    # cache build + replay through distillctl's cache (synthetic uint8 images in memory)
    from distillctl.cache import FeatureCache, build_cache
    from distillctl.data.datasets import ImageDataset
    from distillctl.data.views import ViewSpec
    from distillctl.teachers.base import Teacher

    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 255, size=(args.cache_images, S, S, 3), dtype=np.uint8)
    dataset = ImageDataset("synthetic", [str(i) for i in range(10)], [int(i % 10) for i in range(args.cache_images)],
                           arrays=arrays)
    wrapped = Teacher(name="resnet50", arch="resnet50", backbone=teacher, embed_dim=2048, sha256="0" * 64)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        start = time.perf_counter()
        cache = build_cache(wrapped, dataset, Path(tmp) / "cache", spec=ViewSpec(size=S, family="weak"),
                            views=args.views, outputs={"pooled"}, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                            batch_size=B, device=str(device), amp="bf16", channels_last=True,
                            num_workers=min(8, os.cpu_count() or 1), progress=False)
        build_s = time.perf_counter() - start
        result["cache_build_img_s"] = round(args.cache_images / build_s, 1)
        result["cache_build_views_s"] = round(args.cache_images * args.views / build_s, 1)
        result["cache_bytes_per_image"] = cache.manifest.get("bytes_per_image")
        reopened = FeatureCache.open(Path(tmp) / "cache")
        order = torch.randperm(args.cache_images)
        position = {"i": 0}

        def cached_step() -> None:  # target from the cache lookup, student on on-GPU tensors
            start_i = position["i"] % (args.cache_images - B + 1)
            index = order[start_i:start_i + B]
            views = torch.randint(0, args.views, (B,))
            position["i"] += B
            target = reopened.lookup(index, views)["pooled"].to(device, non_blocking=True)
            loss_step(target, images)

        seconds = timed(cached_step, args.steps, max(2, args.warmup // 2), sync)
        result["cached_distill_step_img_s"] = round(B * args.steps / seconds, 1)
    if "online_distill_step_img_s" in result:
        result["online_over_cached_step_time"] = round(result["cached_distill_step_img_s"]
                                                       / result["online_distill_step_img_s"], 3)

    if not args.skip_onnx and "onnx" in parts:
        result.update(onnx_cuda(student, S, device))
    return _emit(result, args.out)


def _save(result: dict, out: str | None) -> str:
    """Write the JSON line atomically to ``out`` (if given); return it."""
    line = json.dumps(result, sort_keys=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(out).with_suffix(".tmp")
        tmp.write_text(line + "\n")
        tmp.replace(out)
    return line


def _emit(result: dict, out: str | None) -> int:
    """Print the one JSON line and write it atomically to ``out``."""
    print(_save(result, out), flush=True)
    return 0


def write_jpegs(root: Path, count: int, size: int) -> Path:
    """``count`` smooth random JPEGs (ImageNet-like: short side ``size`` * 8/7, 4:3) in a 2-class ImageFolder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    height = max(8, round(size * 8 / 7))
    width = round(height * 4 / 3)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        coarse = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        image.save(root / ("a" if index % 2 else "b") / f"{index:06d}.jpg", quality=90)
    return root


def loader_img_s(folder: Path, size: int, batch: int, workers: int, repeat: int = 2) -> dict:
    """Data loader img/s: decode each JPEG and cut one random-resized-crop training view (uint8), in workers."""
    import torch

    from distillctl.data.datasets import open_dataset
    from distillctl.data.views import ViewSpec, apply_view_uint8, sample_rng, sample_view

    dataset = open_dataset(str(folder), "train")
    spec = ViewSpec(size=size, family="weak")

    class Views(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, index: int):
            image = dataset.load_image(index)
            params = sample_view(spec, int(image.shape[-2]), int(image.shape[-1]), sample_rng(0, 0, index, 0))
            return apply_view_uint8(image, params, spec)

    loader = torch.utils.data.DataLoader(Views(), batch_size=batch, num_workers=workers, shuffle=True,
                                         persistent_workers=workers > 0, drop_last=False)
    for _ in loader:  # warm-up pass: worker start-up and the page cache
        break
    start, seen = time.perf_counter(), 0
    for _ in range(repeat):
        for views in loader:
            seen += len(views)
    seconds = time.perf_counter() - start
    return {"loader_img_s": round(seen / seconds, 1), "loader_workers": workers, "loader_images": seen}


def cached_loop(folder: Path, work: Path, args: argparse.Namespace, cuda: bool, workers: int) -> dict:
    """img/s of ``distillctl run`` (SimReg, cached ResNet-50 teacher, MobileNetV2 student, bf16, channels_last)."""
    import statistics
    import subprocess

    import timm
    from common import metrics_rates  # benchmarks/ is the script's folder
    from safetensors.torch import save_file

    teacher_file = work / "resnet50_random.safetensors"
    teacher = timm.create_model("resnet50", pretrained=False, num_classes=0)
    save_file({key: value.contiguous() for key, value in teacher.state_dict().items()}, str(teacher_file))
    per_epoch = max(1, args.loop_images // args.batch_size)
    out = work / "run"
    command = [sys.executable, "-m", "distillctl", "run", "--method", "simreg", "--teacher", str(teacher_file),
               "--teacher-arch", "resnet50", "--student", "mobilenetv2_100", "--data", str(folder),
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--epochs", str(-(-args.loop_steps // per_epoch)), "--teacher-mode", "cached",
               "--cache-views", str(args.views), "--out", str(out),
               "--set", f"train.max_steps={args.loop_steps}", "--set", "train.amp=bf16",
               "--set", "train.channels_last=true", "--set", f"train.compile={str(not args.no_compile).lower()}",
               "--set", f"data.num_workers={workers}", "--set", "train.log_every=5", "--set", "export.enabled=false",
               "--set", "eval.linear=false", "--set", "eval.teacher=false", "--set", "eval.random_student=false"]
    if not cuda:
        command += ["--device", "cpu"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"loop_error": f"distillctl run exit {done.returncode}: {' | '.join(tail)}"}
    steady = metrics_rates(out)  # the first window holds compilation / warm-up
    return {"cached_loop_img_s": round(statistics.median(steady), 1) if steady else None,
            "cached_loop_windows": len(steady), "cached_loop_wall_s": round(wall, 1),
            "cached_loop_command": " ".join(command[1:])}


def loader_and_loop(args: argparse.Namespace, parts: set[str], cuda: bool) -> dict:
    """The ``loader`` and ``loop`` parts on the same synthetic JPEG folder."""
    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_loop_") as tmp:
        folder = write_jpegs(Path(tmp) / "jpegs", args.loop_images, args.image_size)
        if "loader" in parts:
            out.update(loader_img_s(folder, args.image_size, args.batch_size, workers))
        if "loop" in parts:
            out.update(cached_loop(folder, Path(tmp), args, cuda, workers))
    if out.get("loader_img_s") and out.get("cached_loop_img_s"):
        out["loader_keeps_up"] = out["loader_img_s"] >= out["cached_loop_img_s"]
    return out


def onnx_cuda(student, size: int, device) -> dict:
    """Export the student (eval mode, fp32) to ONNX and time ONNX Runtime's CUDA provider at batch 1 and 256."""
    import numpy as np
    import onnxruntime as ort
    import torch

    out: dict = {"onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers()}
    if "CUDAExecutionProvider" not in out["ort_providers"]:
        out["onnx_error"] = "CUDAExecutionProvider not available (install onnxruntime-gpu)"
        return out
    model = student.eval().float().to(memory_format=torch.contiguous_format)
    with tempfile.TemporaryDirectory(prefix="gpu_check_onnx_") as tmp:
        path = Path(tmp) / "student.onnx"
        dummy = torch.randn(1, 3, size, size, device=device)
        torch.onnx.export(model, (dummy,), str(path), input_names=["images"], output_names=["embedding"],
                          dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        out["ort_provider_used"] = session.get_providers()[0]
        for batch in (1, 256):
            x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
            for _ in range(5):
                session.run(None, {"images": x})
            times = []
            for _ in range(20):
                start = time.perf_counter()
                session.run(None, {"images": x})
                times.append(time.perf_counter() - start)
            p50 = float(np.median(times))
            out[f"ort_cuda_b{batch}_p50_ms"] = round(p50 * 1000, 3)
            out[f"ort_cuda_b{batch}_img_s"] = round(batch / p50, 1)
    return out


if __name__ == "__main__":
    sys.exit(main())
