"""noroozi-kt: cross-entropy on teacher k-means pseudo-labels against a loop-based computation, labels read by
dataset index from checkpointed per-sample state, the artefact declaration, and training + bit-exact resume through
the CLI (cached and online)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from distillctl.methods.noroozi_kt import NorooziKT, NorooziKTParams, pseudo_label_loss
from method_harness import STUDENT_DIM, TEACHER_DIMS, TinyNet, make_images, make_inputs


def cross_entropy_loop(logits: list[list[float]], labels: list[int]) -> float:
    """mean over rows of −(z[c] − log Σ_j exp z[j])."""
    total = 0.0
    for row, label in zip(logits, labels):
        total += -(row[label] - math.log(sum(math.exp(v) for v in row)))
    return total / len(logits)


def built(clusters: int, table: list[int], **params) -> NorooziKT:
    method = NorooziKT(NorooziKTParams(clusters=clusters, **params), STUDENT_DIM, TEACHER_DIMS)
    method.use_artifact(torch.tensor(table))
    method.num_samples = len(table)
    method.setup(TinyNet(STUDENT_DIM))
    return method


@pytest.mark.parametrize("batch,classes", [(1, 2), (3, 5), (8, 17)])
def test_loss_matches_loop(batch: int, classes: int) -> None:
    generator = torch.Generator().manual_seed(batch * 7 + classes)
    logits = torch.randn(batch, classes, dtype=torch.float64, generator=generator) * 3
    labels = torch.randint(0, classes, (batch,), generator=generator)
    loss, logs = pseudo_label_loss(logits, labels)
    assert float(loss) == pytest.approx(cross_entropy_loop(logits.tolist(), labels.tolist()), rel=1e-12)
    hits = sum(int(max(range(classes), key=lambda j: row[j]) == c) for row, c in zip(logits.tolist(), labels.tolist()))
    assert logs["pseudo_label_acc"] == pytest.approx(hits / batch)


def test_method_reads_labels_by_dataset_index_including_a_one_member_cluster() -> None:
    table = [2, 0, 1, 2, 0, 3]  # cluster 1 and cluster 3 have one member each
    method = built(4, table).double()
    student = TinyNet(STUDENT_DIM).double()
    images = [i.double() for i in make_images(method, 4, 16)]
    index = torch.tensor([5, 2, 0, 3])
    inputs = make_inputs(method, student, None, images, index=index)
    assert method.requirements(16).views[0].teacher is False  # the teacher never runs during training
    loss, _ = method.loss(inputs)
    logits = method.classifier(student(images[0])).tolist()
    assert float(loss.detach()) == pytest.approx(cross_entropy_loop(logits, [3, 1, 2, 2]), rel=1e-12)
    loss.backward()
    assert method.classifier.weight.grad.abs().sum() > 0


def test_labels_are_checkpointed_with_the_method() -> None:
    method = built(3, [1, 0, 2, 2, 1])
    assert torch.equal(method.state_dict()["labels.values"], torch.tensor([1, 0, 2, 2, 1]))
    fresh = built(3, [0, 0, 0, 0, 0])
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.labels.values, torch.tensor([1, 0, 2, 2, 1])) and bool(fresh.labels.written.all())


def test_setup_refuses_a_missing_or_misfit_artefact() -> None:
    method = NorooziKT(NorooziKTParams(clusters=3), STUDENT_DIM, TEACHER_DIMS)
    method.num_samples = 4
    with pytest.raises(RuntimeError, match="no teacher artefact"):
        method.setup(TinyNet(STUDENT_DIM))
    method.use_artifact(torch.zeros(5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="5 rows for 4"):
        method.setup(TinyNet(STUDENT_DIM))


def test_artefact_declaration_and_cache_mode() -> None:
    method = NorooziKT(NorooziKTParams(clusters=7, kmeans_iters=5, kmeans_seed=3), STUDENT_DIM, TEACHER_DIMS)
    wanted = method.teacher_artifact()
    assert (wanted.kind, wanted.size, wanted.iters, wanted.seed, wanted.output) == ("kmeans", 7, 5, 3, "pooled")
    req = method.requirements(16)
    assert req.teacher_mode == "cached_exact" and req.needs_index and req.teacher_outputs == {"pooled"}
    assert method.classifier.out_features == 7
    projection = NorooziKT(NorooziKTParams(teacher_feature="projection"), STUDENT_DIM, TEACHER_DIMS)
    assert projection.teacher_artifact().output == "proj"


def test_params_defaults_and_domains() -> None:
    params = NorooziKTParams()
    assert (params.clusters, params.kmeans_iters, params.kmeans_seed, params.crop_scale) == (2000, 20, 0, (0.08, 1.0))
    for bad in ({"clusters": 0}, {"kmeans_iters": 0}, {"kmeans_seed": -1}, {"teacher_feature": "auto"}, {"k": 3}):
        with pytest.raises(ValidationError):
            NorooziKTParams(**bad)


TINY = ["--set", "method.params.clusters=8", "--set", "method.params.flip=false"]


@pytest.mark.slow
def test_trains_and_resumes_exactly(tmp_path, tiny_teacher_file) -> None:
    from pooled_e2e import train_and_resume

    train_and_resume(tmp_path, tiny_teacher_file, "noroozi-kt", TINY)  # auto: cached
    artefacts = sorted(p.name for p in (tmp_path / "full" / "cache" / "artifacts").iterdir())
    assert artefacts == ["kmeans_pooled_c8_s0.centroids.npy", "kmeans_pooled_c8_s0.json", "kmeans_pooled_c8_s0.npy"]
    labels = np.load(tmp_path / "full" / "cache" / "artifacts" / "kmeans_pooled_c8_s0.npy")
    assert labels.shape == (96,) and len(set(labels.tolist())) > 1
    manifest = json.loads((tmp_path / "full" / "cache" / "manifest.json").read_text())
    assert manifest["views"] == 1  # only the centre crop is needed


@pytest.mark.slow
def test_online_run_builds_the_centre_view_cache_first(tmp_path, tiny_teacher_file) -> None:
    from pooled_e2e import _args, losses_of
    from tests.conftest import run_cli

    result = run_cli(*_args("noroozi-kt", tmp_path / "online", tiny_teacher_file, [*TINY, "--teacher-mode", "online"]))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = losses_of(tmp_path / "online")
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses) and min(losses[1:]) < losses[0]
    assert (tmp_path / "online" / "cache" / "artifacts" / "kmeans_pooled_c8_s0.npy").is_file()
    summary = json.loads((tmp_path / "online" / "summary.json").read_text())
    assert summary["train"]["teacher_mode"] == "online"


@pytest.mark.slow
def test_too_many_clusters_is_a_usage_error(tmp_path, tiny_teacher_file) -> None:
    from pooled_e2e import _args
    from tests.conftest import run_cli

    result = run_cli(*_args("noroozi-kt", tmp_path / "bad", tiny_teacher_file, ["--set", "method.params.clusters=500"]))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "method.params.clusters=500 for noroozi-kt needs more training images than the 96 there are" in result.stderr


def test_recipes_validate() -> None:
    from pooled_e2e import check_recipes

    check_recipes("noroozi-kt")
