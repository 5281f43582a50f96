"""Task-level gate for quantized artefacts: kNN top-1 of the INT8 file vs the fp32 file.

Embedding cosine (the parity gate) says the vectors point the same way on average; it does not say
the neighbourhoods that retrieval and kNN rely on survived quantization. So both artefacts are
evaluated under the same protocol (weighted kNN, cosine, k=20, T=0.07, centre-view eval transform,
same labelled splits), and the drop in points is checked against a budget (``--max-drop``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distillctl.errors import GateError


@dataclass
class AccuracyReport:
    """kNN top-1 (percent) of a reference and a candidate artefact, and the verdict."""

    reference: str
    candidate: str
    reference_top1: float
    candidate_top1: float
    drop: float  # points, reference - candidate (negative = candidate better)
    max_drop: float
    passed: bool
    k: int
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise GateError(
                f"INT8 accuracy gate failed for {self.candidate}: kNN@{self.k} top-1 {self.candidate_top1:.2f}% vs "
                f"{self.reference_top1:.2f}% fp32, a drop of {self.drop:.2f} points > budget {self.max_drop:g} "
                f"(over by {self.drop - self.max_drop:.2f})",
                hint="try more --calib-size images or --calib-method auto (it tries every method and leaves the most "
                     "sensitive layers in float; the tries are in the model card), or raise --max-drop",
            )


def knn_top1_of_artifact(
    path: str | Path,
    train_dataset: Any,
    test_dataset: Any,
    *,
    input_size: int,
    mean: list[float],
    std: list[float],
    crop_pct: float,
    k: int,
    temperature: float,
    batch_size: int = 128,
) -> float:
    """Embed both splits with an ONNX artefact (onnxruntime) or an OpenVINO IR on CPU; weighted-kNN top-1 (percent)."""
    import torch

    from distillctl.eval.features import OnnxEncoder, embed_dataset
    from distillctl.eval.knn import knn_evaluate

    if Path(path).suffix == ".xml":  # an OpenVINO IR
        from distillctl.export.openvino import OpenVinoEncoder

        encoder = OpenVinoEncoder(path, threads=torch.get_num_threads())
    else:
        encoder = OnnxEncoder(path, providers=["CPUExecutionProvider"], threads=torch.get_num_threads())
    common = dict(input_size=input_size, mean=mean, std=std, crop_pct=crop_pct, batch_size=batch_size)
    train_emb, train_labels = embed_dataset(encoder, train_dataset, **common)
    test_emb, test_labels = embed_dataset(encoder, test_dataset, **common)
    return float(knn_evaluate(train_emb, train_labels, test_emb, test_labels, ks=(k,), temperature=temperature)[k])


def compare_knn(
    reference_path: str | Path,
    candidate_path: str | Path,
    train_dataset: Any,
    test_dataset: Any,
    *,
    input_size: int,
    mean: list[float],
    std: list[float],
    crop_pct: float,
    max_drop: float = 1.0,
    k: int = 20,
    temperature: float = 0.07,
    reference_top1: float | None = None,
    max_train_images: int = 20000,
    max_test_images: int = 10000,
) -> AccuracyReport:
    """kNN top-1 of both artefacts under one protocol; ``reference_top1`` skips recomputing the fp32 one."""
    from distillctl.eval.knn import knn_protocol

    # Large data sets (ImageNet): a fixed seeded subset keeps the gate to minutes on a CPU; both
    # artefacts see the same images, and the counts are recorded in the protocol.
    train_dataset = _capped(train_dataset, max_train_images)
    test_dataset = _capped(test_dataset, max_test_images)
    k = min(k, len(train_dataset))  # tiny data sets: kNN@k needs k train embeddings (recorded below)
    common = dict(input_size=input_size, mean=mean, std=std, crop_pct=crop_pct, k=k, temperature=temperature)
    if reference_top1 is None:
        reference_top1 = knn_top1_of_artifact(reference_path, train_dataset, test_dataset, **common)
    candidate_top1 = knn_top1_of_artifact(candidate_path, train_dataset, test_dataset, **common)
    drop = reference_top1 - candidate_top1
    protocol = {**knn_protocol((k,), temperature), "train": getattr(train_dataset, "name", ""),
                "test": getattr(test_dataset, "name", ""), "train_images": len(train_dataset),
                "test_images": len(test_dataset), "transform": "centre crop", "crop_pct": crop_pct,
                "runtime": _runtime(candidate_path)}
    return AccuracyReport(
        reference=Path(reference_path).name, candidate=Path(candidate_path).name,
        reference_top1=round(reference_top1, 4), candidate_top1=round(candidate_top1, 4), drop=round(drop, 4),
        max_drop=float(max_drop), passed=bool(drop <= max_drop), k=k, protocol=protocol,
    )


def _capped(dataset: Any, limit: int) -> Any:
    """``dataset`` itself, or a seeded random subset of ``limit`` images (sorted indices)."""
    if len(dataset) <= limit:
        return dataset
    import numpy as np

    indices = np.sort(np.random.default_rng(0).permutation(len(dataset))[:limit])
    return dataset.subset(indices, name=f"{getattr(dataset, 'name', 'data')}[seeded subset {limit}]")


def _runtime(path: str | Path) -> str:
    if Path(path).suffix == ".xml":
        from distillctl.export.openvino import runtime_description

        return runtime_description(path)
    return "onnxruntime CPUExecutionProvider"
