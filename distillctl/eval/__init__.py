"""Evaluation of frozen embeddings (weighted kNN, linear probe) for checkpoints and exported artefacts."""

from distillctl.eval.embedding_cache import EmbeddingCache, embed_dataset_cached
from distillctl.eval.features import (
    Encoder,
    OnnxEncoder,
    TorchEncoder,
    embed_dataset,
    load_encoder,
    register_artifact_loader,
)
from distillctl.eval.knn import knn_evaluate, knn_protocol
from distillctl.eval.linear import LinearProbeConfig, LinearProbeResult, linear_probe, linear_probe_embeddings

__all__ = [
    "Encoder",
    "EmbeddingCache",
    "OnnxEncoder",
    "TorchEncoder",
    "embed_dataset",
    "embed_dataset_cached",
    "LinearProbeConfig",
    "LinearProbeResult",
    "knn_evaluate",
    "knn_protocol",
    "linear_probe",
    "linear_probe_embeddings",
    "load_encoder",
    "register_artifact_loader",
]
