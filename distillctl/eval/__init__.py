"""Evaluation of frozen embeddings (weighted kNN, linear probe) for checkpoints and exported artefacts."""

from distillctl.eval.features import (
    Encoder,
    FeatureCache,
    OnnxEncoder,
    TorchEncoder,
    embed_dataset,
    embed_dataset_cached,
    load_encoder,
    register_artifact_loader,
)
from distillctl.eval.knn import knn_evaluate

__all__ = [
    "Encoder",
    "FeatureCache",
    "OnnxEncoder",
    "TorchEncoder",
    "embed_dataset",
    "embed_dataset_cached",
    "knn_evaluate",
    "load_encoder",
    "register_artifact_loader",
]
