"""INT8 activation ranges from calibration images, one batch at a time (any number of images).

onnxruntime's ``quantize_static`` calibrates through a data reader and has two defects that hit
distillctl's students (both measured on onnxruntime 1.32):

- its histogram calibrators (percentile, entropy) keep every batch's activations and stack them
  with ``np.asarray`` at the end, which raises ``ValueError: ... inhomogeneous shape`` as soon as
  the last batch is smaller than the others (e.g. 200 images at batch 16), and holds all
  activations of all images in memory at once;
- its entropy calibrator defaults to 128 histogram bins *and* 128 quantized bins, so the KL
  search has exactly one candidate window — the full range — and entropy calibration returns the
  MinMax ranges bit for bit (``quantize_static`` offers no option to change the bin counts).

So distillctl drives onnxruntime's calibrators itself: one ``collect_data`` call per batch (the
collectors merge ranges and histograms incrementally, so the batches may differ in size and memory
stays one batch deep), and the entropy threshold is found by its own vectorised KL search over a
2048-bin histogram with 255 quantized levels (the 8-bit range; the search TensorRT's entropy
calibrator popularised). The ranges are written to onnxruntime's calibration cache format, which
``quantize_static`` reads through its public ``calibration_cache_path`` argument, so one
calibration serves every INT8 form (ORT CPU and TensorRT) of the same graph.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from distillctl.errors import UsageError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
ENTROPY_HISTOGRAM_BINS = 2048
ENTROPY_QUANTIZED_BINS = 255  # 8-bit: 255 levels over the symmetric window [-t, t]
ENTROPY_CANDIDATES = 224  # windows tried per tensor (every 4th width of a 2048-bin histogram)
PERCENTILE_HISTOGRAM_BINS = 2048
DEFAULT_PERCENTILE = 99.999
DEFAULT_CALIBRATION_BATCH = 16


class _OneBatch:
    """A ``CalibrationDataReader`` that yields a single batch (one ``collect_data`` call per batch)."""

    def __init__(self, feed: dict[str, np.ndarray]) -> None:
        self.feed: dict[str, np.ndarray] | None = feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed, self.feed = self.feed, None
        return feed


def ort_method(name: str):
    """onnxruntime's ``CalibrationMethod`` for a distillctl method name."""
    from onnxruntime.quantization import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if name not in methods:
        raise UsageError(f"unknown calibration method '{name}'; valid: {', '.join(CALIBRATION_METHODS)}")
    return methods[name]


def calibrate(
    model_path: str | Path,
    images: np.ndarray,
    method: str,
    workdir: str | Path,
    *,
    input_name: str = "input",
    batch_size: int = DEFAULT_CALIBRATION_BATCH,
    percentile: float = DEFAULT_PERCENTILE,
):
    """Activation ranges (onnxruntime ``TensorsData``) of ``model_path`` over ``images`` (N,3,H,W float32).

    ``model_path`` should be the ``quant_pre_process``-ed graph that is then quantized. Works for
    any ``N >= 1`` and any ``batch_size`` (the last batch may be smaller).
    """
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, create_calibrator

    calibrate_method = ort_method(method)
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise UsageError(f"INT8 calibration needs a non-empty (N,3,H,W) batch of images, got shape {images.shape}")
    if batch_size < 1:
        raise UsageError(f"calibration batch size must be >= 1, got {batch_size}")
    options: dict = {}
    if method == "entropy":
        options = {"num_bins": ENTROPY_HISTOGRAM_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS}
    elif method == "percentile":
        options = {"num_bins": PERCENTILE_HISTOGRAM_BINS, "percentile": percentile}
    workdir = Path(workdir)
    # onnxruntime's calibrators print progress on stdout: keep it out of `--json` output.
    with contextlib.redirect_stdout(io.StringIO()):
        calibrator = create_calibrator(Path(model_path), None, augmented_model_path=str(workdir / "augmented.onnx"),
                                       calibrate_method=calibrate_method, extra_options=options)
        if method == "percentile":
            calibrator.collector = narrow_range_safe_collector(calibrator)
        for start in range(0, len(images), batch_size):
            calibrator.collect_data(_OneBatch({input_name: images[start:start + batch_size]}))
        if method == "entropy":
            keep_full = full_range_tensors(model_path)
            histograms = calibrator.collector.get_histogram_dict()
            ranges = {name: (float(h[2]), float(h[3])) if name in keep_full else entropy_range(h)
                      for name, h in histograms.items()}
        else:
            ranges = {name: tuple(data.range_value) for name, data in calibrator.compute_data().items()}
    data = {name: TensorData(lowest=np.asarray(low, dtype=np.float32), highest=np.asarray(high, dtype=np.float32))
            for name, (low, high) in ranges.items()}
    return TensorsData(calibrate_method, data)


def narrow_range_safe_collector(calibrator):
    """onnxruntime's histogram collector for ``calibrator``, safe for tensors whose values barely vary.

    For percentile calibration onnxruntime histograms ``|x|`` over ``[min|x|, max|x|]`` in the data's
    float32, and numpy raises ``ValueError: Too many bins for data range`` when that span is too
    narrow for 2048 distinct float32 bin edges: e.g. squeeze-excitation gates whose sigmoid sits at
    0.5 ± 5e-5 for every image (measured on EfficientNet-B0, which made ``--calib-method auto`` exit 1).
    Such a tensor's first histogram is started here over ``[0, ~max|x|]`` instead (empty; onnxruntime
    then adds the batch to it and merges later batches as usual); every other tensor is untouched.
    """
    from onnxruntime.quantization.calibrate import HistogramCollector

    class NarrowRangeSafeCollector(HistogramCollector):
        def collect_absolute_value(self, name_to_arr):
            for tensor, values in name_to_arr.items():
                if tensor not in self.histogram_dict:
                    seeded = _empty_absolute_histogram(np.asarray(values), self.num_bins)
                    if seeded is not None:
                        self.histogram_dict[tensor] = seeded
            return super().collect_absolute_value(name_to_arr)

    return NarrowRangeSafeCollector(method=calibrator.method, symmetric=calibrator.symmetric,
                                    num_bins=calibrator.num_bins, num_quantized_bins=calibrator.num_quantized_bins,
                                    percentile=calibrator.percentile, scenario=calibrator.scenario)


def _empty_absolute_histogram(values: np.ndarray, bins: int) -> tuple | None:
    """``(zero counts, edges over [0, max|x|], min, max)`` when numpy could not bin ``|values|`` itself, else None."""
    magnitudes = np.abs(values.astype(np.float32, copy=False).ravel())
    if magnitudes.size == 0:
        return None
    low, high = float(np.nanmin(magnitudes)), float(np.nanmax(magnitudes))
    if not high > low or np.all(np.diff(np.linspace(low, high, bins + 1, dtype=np.float32)) > 0):
        return None  # constant (numpy widens it) or wide enough: onnxruntime's own histogram
    # One bin past max|x|, so that onnxruntime's percentile (the left edge of the bin the percentile falls
    # in) lands on max|x| rather than a bin below the values (which would invert the range).
    edges = np.linspace(0.0, high * bins / (bins - 1), bins + 1, dtype=np.float32)
    flat = values.ravel()
    return (np.zeros(bins, dtype=np.int64), edges, np.nanmin(flat), np.nanmax(flat))


EMBEDDING_PATH_OPS = ("ReduceMean", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Squeeze", "Identity")


def full_range_tensors(model_path: str | Path) -> set[str]:
    """Tensors whose range entropy calibration must not clip (their observed min/max is kept).

    - the embedding itself and the tensors it is pooled or reshaped from: an embedding's direction
      lives in its largest channels, and clipping them is what KL calibration (built for classifier
      logits, which only need their argmax) does to a heavy-tailed embedding;
    - outputs of ``Clip`` (ReLU6 and friends): their upper bound is the saturation value itself, a
      spike of real mass at the top that the KL search mistakes for a tail.

    Measured on the 64 px MobileNetV2 benchmark student: clipping these took entropy calibration to a
    mean embedding cosine of 0.64 (the pooled embedding clipped from 4.9 to 1.5, ReLU6 outputs from
    6 to about 2).
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {output: node for node in graph.node for output in node.output}
    keep = {node.output[0] for node in graph.node if node.op_type == "Clip"}
    frontier = [output.name for output in graph.output]
    while frontier:
        name = frontier.pop()
        if name in keep and name not in {o.name for o in graph.output}:
            continue
        keep.add(name)
        node = producer.get(name)
        if node is not None and node.op_type in EMBEDDING_PATH_OPS and node.input:
            frontier.append(node.input[0])
    return keep


def write_calibration_cache(tensors_data, path: str | Path) -> Path:
    """Write ranges in onnxruntime's calibration-cache format (``quantize_static(calibration_cache_path=...)``)."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    save_tensors_data(tensors_data, Path(path))
    return Path(path)


def ranges_of(tensors_data) -> dict[str, tuple[float, float]]:
    """``{tensor: (low, high)}`` as plain floats (for tests and reports)."""
    return {name: (float(np.min(data.range_value[0])), float(np.max(data.range_value[1])))
            for name, data in tensors_data.items()}


def entropy_range(histogram: tuple) -> tuple[float, float]:
    """KL-optimal clipping range of one tensor from onnxruntime's symmetric value histogram.

    ``histogram`` is ``(counts, edges, min, max, threshold)`` over ``[-threshold, threshold]``.
    Windows centred on zero from ``ENTROPY_QUANTIZED_BINS`` bins wide to the full histogram are the
    candidates (about ``ENTROPY_CANDIDATES`` of them, evenly spaced, the full width always); the reference distribution folds the clipped outliers into the window's end bins, the
    candidate distribution is the window requantized to the 8-bit levels (each level's mass spread
    over the bins that were non-zero), and the window with the smallest KL divergence wins. The
    result is clamped to the observed [min, max], as onnxruntime does.
    """
    counts = np.asarray(histogram[0], dtype=np.float64)
    edges = np.asarray(histogram[1], dtype=np.float64)
    low, high = float(histogram[2]), float(histogram[3])
    bins = len(counts)
    zero = bins // 2
    half = ENTROPY_QUANTIZED_BINS // 2
    if counts.sum() == 0 or zero < half:
        return low, high
    cumulative = np.concatenate(([0.0], np.cumsum(counts)))
    best_kl, best = np.inf, (edges[0], edges[-1])
    step = max(1, (zero - half) // ENTROPY_CANDIDATES)  # histograms can grow past 2048 bins while merging
    for width in sorted(set(range(half, zero + 1, step)) | {zero}):
        start, end = zero - width, min(zero + width + 1, bins)
        divergence = _window_kl(counts[start:end], cumulative[start], cumulative[bins] - cumulative[end])
        if divergence < best_kl:
            best_kl, best = divergence, (edges[start], edges[end])
    return max(float(best[0]), low), min(float(best[1]), high)


def _window_kl(window: np.ndarray, left_outliers: float, right_outliers: float) -> float:
    """KL(reference || requantized) of one candidate window (see :func:`entropy_range`)."""
    reference = window.copy()
    reference[0] += left_outliers
    reference[-1] += right_outliers
    levels = ENTROPY_QUANTIZED_BINS
    bounds = np.linspace(0, len(window), levels + 1).astype(np.int64)
    level = np.repeat(np.arange(levels), np.diff(bounds))
    nonzero = reference > 0
    mass = np.bincount(level, weights=window, minlength=levels)
    support = np.bincount(level, weights=nonzero, minlength=levels)
    candidate = np.where(nonzero, mass[level] / np.maximum(support[level], 1.0), 0.0)
    p = reference[nonzero]
    q = np.maximum(candidate[nonzero], 1e-4)  # a clipped-away outlier bin: heavily penalised, not infinite
    p = p / p.sum()
    q = q / q.sum()
    return float(np.sum(p * np.log(p / q)))
