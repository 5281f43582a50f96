"""Feature cache: teacher outputs for K stored views per image, built once and replayed exactly.

Public surface: :class:`FeatureCache` (read), :func:`build_cache` (write / resume / reuse), :func:`spot_check`,
:func:`cache_fingerprint`, and the offline artefacts :func:`knn_bags` and :func:`kmeans_labels`.
"""

from distillctl.cache.artifacts import kmeans_labels, knn_bags
from distillctl.cache.build import build_cache, cache_fingerprint, stored_view
from distillctl.cache.drift import spot_check
from distillctl.cache.store import FeatureCache, VerifyReport

__all__ = ["FeatureCache", "VerifyReport", "build_cache", "cache_fingerprint", "kmeans_labels", "knn_bags",
           "spot_check", "stored_view"]
