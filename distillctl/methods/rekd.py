"""ReKD (Zheng et al., AAAI 2022): relation-wise contrastive learning with teacher-mined semantic relations.

The student learns by MoCo-v2-style contrast (queries from the student + head, keys from their EMA copy, a
queue of past keys). The teacher contributes relations, mined once offline from its centre-crop embeddings of the
training set (beside the feature cache): images in the same k-means cluster, or kNN neighbours. A queue key of
an image related to the query's image is an extra positive, as in supervised contrastive learning with teacher
pseudo-labels. Without related keys the loss is plain InfoNCE. No official code exists; every choice beyond the
abstract is listed in ``assumptions``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from distillctl._infra import all_gather_concat, info
from distillctl.data.views import ViewSpec
from distillctl.methods.base import MethodInputs, MethodView, Requirements, register
from distillctl.methods.common import FeatureQueue
from distillctl.methods.domains import Count, NonNegative, OptionalCount
from distillctl.methods.mocov2 import MocoV2, MocoV2Params, batch_logits
from distillctl.methods.presets import PublishedRecipe
from distillctl.methods.shared import TeacherArtifact, UsesTeacherArtifact, at_least_float32, teacher_target
from distillctl.methods.collapse import LOG_KEY, embedding_cosine


class ReKDParams(MocoV2Params):
    relations: Literal["kmeans", "knn"] = "kmeans"  # how the teacher's relations are mined (offline artefact)
    clusters: Count = 1000  # kmeans: clusters of the teacher's centre-crop embeddings
    kmeans_iters: Count = 20
    kmeans_seed: OptionalCount = 0
    knn_k: Count = 5  # knn: neighbours per image (BINGO's bag size)
    relation_weight: NonNegative = 1.0  # weight of each related positive against the own key (0: plain MoCo v2)
    teacher_feature: Literal["backbone", "projection"] = "backbone"  # what the relations are mined from


def relation_info_nce(query: torch.Tensor, positive: torch.Tensor, bank: torch.Tensor, related: torch.Tensor,
                      temperature: float, weight: float) -> torch.Tensor:
    """Multi-positive InfoNCE over logits [q·k+, q·Q]/τ (inputs L2-normalised), per query b:

    L_b = −(log p_b(k+) + w·Σ_{j: related[b,j]} log p_b(Q_j)) / (1 + w·|{j: related[b,j]}|)

    with p_b the softmax over the 1 + K logits; mean over b. An empty relation set (or w = 0) gives MoCo's
    InfoNCE; w = 1 weighs every positive equally (SupCon's "out" average)."""
    query = at_least_float32(query)
    logits = torch.cat([(query * positive.to(query.dtype)).sum(dim=1, keepdim=True),
                        query @ bank.to(query.dtype).t()], dim=1) / temperature
    log_prob = F.log_softmax(logits, dim=1)
    mask = related.to(log_prob.dtype) * weight
    numerator = log_prob[:, 0] + (mask * log_prob[:, 1:]).sum(dim=1)
    return -(numerator / (1.0 + mask.sum(dim=1))).mean()


def relation_batch_nce(query: torch.Tensor, keys: torch.Tensor, related: torch.Tensor, temperature: float,
                       weight: float) -> torch.Tensor:
    """The same multi-positive InfoNCE with in-batch negatives (``negatives=batch``): logits q·k/τ against the keys
    of every rank's batch; query b's positives are its own key (column rank·B + b) and, weighted w, the keys of
    related images (``related``: B × world·B, own column excluded)::

        L_b = −(log p_b(own) + w·Σ_{j: related[b,j]} log p_b(k_j)) / (1 + w·|{j: related[b,j]}|)"""
    query = at_least_float32(query)
    logits, own = batch_logits(query, keys.to(query.dtype), temperature)
    log_prob = F.log_softmax(logits, dim=1)
    mask = related.to(log_prob.dtype) * weight
    numerator = log_prob.gather(1, own[:, None])[:, 0] + (mask * log_prob).sum(dim=1)
    return -(numerator / (1.0 + mask.sum(dim=1))).mean()


@register
class ReKD(UsesTeacherArtifact, MocoV2):
    name = "rekd"
    kind = "distill"
    queue_negatives = True
    title = "ReKD: Boosting contrastive learning with relation knowledge distillation (Zheng et al., AAAI 2022)"
    objective = (
        "MoCo-v2 student: q = n(g(S(x1))), k = n(g_ema(S_ema(x2))) from an EMA (m=0.999) copy of student+head, "
        "queue Q of past keys (K=65536) with their dataset indices (negatives=batch: the batch's keys), τ=0.2, "
        "both views as queries. Offline, the "
        "teacher's pooled centre-crop embeddings give each image its relations: same spherical k-means cluster "
        "(C=1000; or kNN neighbours, either direction). Per query b: L_b = −(log p(k+) + w·Σ_{j∈R(b)} log p(Q_j)) / "
        "(1 + w·|R(b)|), p = softmax([q·k+, q·Q]/τ), R(b) = queue keys of images related to b's image (or b's "
        "own older keys), w=1. R(b) = ∅ gives plain InfoNCE. The teacher never runs during training."
    )
    published = (
        "AlexNet linear top-1 on ImageNet 44.7 (previous best SSL) → 50.1 with ReKD, supervised 50.5 (abstract); "
        "improvements on 'multiple lightweight models' (numbers not retrieved)."
    )
    sources = (
        "No official code: the abstract says 'code will be made available', none was found (methods.md §5). "
        "Paper only, and only its abstract and introduction were retrievable (arXiv 2112.04174): relation mining, "
        "teacher, temperatures, queue and weights are assumptions below."
    )
    assumptions = (
        "Student contrast: MoCo v2 (EMA key encoder, queue, τ=0.2, 2-layer MLP head to 128-d, MoCo-v2 "
        "augmentation, symmetric loss) — the instance-wise contrastive paradigm the paper starts from.",
        "Relations: mined once, offline, from the teacher's pooled centre-crop embeddings (the feature cache's view "
        "0): same k-means cluster (relations=kmeans, default) or kNN neighbour (relations=knn, j in bag(i) or i in "
        "bag(j), k=5). The paper mines them with a 'heterogeneous teacher' without published details; a fixed "
        "offline table is what a feature cache can serve (methods.md §(b): 'ReKD (cached semantic clusters)').",
        "Cluster count 1000 (the ImageNet class count, so a relation approximates 'same class'); 20 spherical "
        "k-means iterations, seed 0 (cache/artifacts.kmeans_labels).",
        "Extra positives are queue keys only (the MoCo denominator has no in-batch keys); an older key of the same "
        "image counts as related. Keys enter the queue after the step, so relations from the current batch act "
        "from the next step on. With negatives=batch (what method.preset=auto picks on short runs, see "
        "presets.derive_negatives) the denominator is the batch's keys instead (all ranks'), b's own key is its "
        "positive and the keys of related images in the batch are the extra positives; no queue is kept.",
        "Positive weighting: each related key weighs w=1 like the own key, averaged (SupCon's L_out form); "
        "relation_weight=0 recovers MoCo v2. Empty relation sets (a one-member cluster, no related key in the "
        "queue, random initial queue rows) give plain InfoNCE for that query.",
        "Cache mode cached_exact: relations come from the feature cache's offline artefact; with --teacher-mode "
        "online the run builds the cache's one centre-crop view first (one teacher pass) and the teacher is not "
        "used after it. Relative to the paper's (unpublished) mining this is the cache approximation.",
        "Under DDP the queue holds every rank's keys and indices (all-gathered), so relations span the global batch.",
        "Optimiser: MoCo v2's SGD lr 0.03 at batch 256, 200 epochs (assumed; the paper's schedule was not retrieved).",
    )
    Params = ReKDParams
    preset_recipe = PublishedRecipe(
        source="ReKD: assumed MoCo v2 schedule (SGD lr 0.03, batch 256, 200 epochs); the paper's was not retrieved",
        optimizer="sgd", lr=0.03, batch=256, published_rule="none", auto_rule="linear", epochs=200,
        rule_source="MoCo's README: linear lr scaling for other batch sizes", ema=("momentum",),
        negatives=("negatives",))

    def __init__(self, params: ReKDParams, student_dim: int, teacher_dims) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.target_key, _ = teacher_target(self.name, teacher_dims, params.teacher_feature)
        # dataset index + 1 of each queue row (0: a random initial row, related to nothing), in step with the keys
        self.queue_index = (FeatureQueue(params.queue_size, 1, normalize_init=False, init="zeros")
                            if params.negatives == "queue" else None)
        self.relation_table = None  # SampleState: (N,) cluster labels or (N, k) neighbours, created in setup()

    def teacher_artifact(self) -> TeacherArtifact:
        if self.params.relations == "kmeans":
            return TeacherArtifact("kmeans", self.params.clusters, self.params.kmeans_iters, self.params.kmeans_seed,
                                   self.target_key)
        return TeacherArtifact("knn", self.params.knn_k, output=self.target_key)

    def setup(self, student: nn.Module) -> None:
        super().setup(student)
        self.relation_table = self.artifact_state()

    def requirements(self, image_size: int) -> Requirements:
        spec = ViewSpec(size=image_size, family=self.params.augmentation, scale=self.params.crop_scale,
                        flip=self.params.flip)
        view = MethodView(spec, teacher=False)
        return Requirements(views=(view, view), teacher_outputs=frozenset({self.target_key}),
                            teacher_mode="cached_exact", needs_index=True)

    def relations(self, index: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """(B, M) bool: image ``others[j]`` is related to image ``index[b]`` or is that image (-1: no image)."""
        if self.relation_table is None:
            raise RuntimeError(f"{self.name}: setup(student) was not called before training")
        table = self.relation_table.values
        index, others = index.to(table.device), others.to(table.device)
        valid = others >= 0
        rows = others.clamp_min(0)
        related = others[None, :] == index[:, None]
        if self.params.relations == "kmeans":
            related |= table[index][:, None] == table[rows][None, :]
        else:
            related |= (table[index][:, :, None] == others[None, None, :]).any(dim=1)  # other image in b's bag
            related |= (table[rows][None, :, :] == index[:, None, None]).any(dim=2)  # b's image in its bag
        return related & valid[None, :]

    def related(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: queue row j holds a key of an image related to image ``index[b]`` (or of that image)."""
        return self.relations(index, self.queue_index.data[:, 0].round().long() - 1)  # -1: a random initial row

    def related_in_batch(self, index: torch.Tensor) -> torch.Tensor:
        """(B, world·B) bool: column j (every rank's batch, rank order) shows an image related to ``index[b]``;
        b's own column (its positive) is excluded."""
        gathered = all_gather_concat(index)
        related = self.relations(index, gathered)
        own = torch.arange(index.shape[0], device=related.device) + info().rank * index.shape[0]
        related[torch.arange(index.shape[0], device=related.device), own] = False
        return related

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        queries = [F.normalize(self.head(f), dim=1) for f in inputs.student_features]
        keys = [self._keys(img) for img in inputs.images]
        tau, weight = self.params.temperature, self.params.relation_weight
        if self.queue is not None:
            related = self.related(inputs.index)

            def contrast(query, key):
                return relation_info_nce(query, key, self.queue.data, related, tau, weight)
        else:
            related = self.related_in_batch(inputs.index)

            def contrast(query, key):
                return relation_batch_nce(query, key, related, tau, weight)
        loss = contrast(queries[0], keys[1])
        if self.params.symmetric:
            loss = (loss + contrast(queries[1], keys[0])) / 2
        inputs.extras["keys"] = keys[1] if not self.params.symmetric else torch.cat(keys)
        inputs.extras["key_index"] = inputs.index if not self.params.symmetric else torch.cat([inputs.index] * 2)
        return loss, {"related_per_query": related.sum(dim=1).float().mean(), LOG_KEY: embedding_cosine(queries[0])}

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        super().after_step(inputs)  # EMA update, enqueue the keys
        if self.queue_index is not None:
            self.queue_index.enqueue((inputs.extras["key_index"].float() + 1)[:, None])
