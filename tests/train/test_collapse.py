"""The collapse watch: the pairwise-cosine measure, the two-row rule, and the run's warning and summary record."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from distillctl.methods.collapse import COLLAPSE_COSINE, LOG_KEY, CollapseWatch, embedding_cosine
from distillctl.methods.simreg import SimReg
from tests.conftest import temporary_methods, tiny_run_args


def _loop_cosine(rows: torch.Tensor) -> float:
    total, pairs = 0.0, 0
    for i in range(rows.shape[0]):
        for j in range(rows.shape[0]):
            if i != j:
                total += float(F.cosine_similarity(rows[i], rows[j], dim=0))
                pairs += 1
    return total / pairs


def test_embedding_cosine_matches_the_pairwise_loop():
    rows = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    assert float(embedding_cosine(rows)) == pytest.approx(_loop_cosine(rows), abs=1e-6)


def test_embedding_cosine_edge_cases():
    same = torch.tensor([[3.0, 4.0]] * 4)
    assert float(embedding_cosine(same)) == pytest.approx(1.0, abs=1e-6)  # scale does not matter
    assert float(embedding_cosine(torch.eye(6))) == pytest.approx(0.0, abs=1e-7)  # orthogonal
    assert float(embedding_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))) == pytest.approx(-1.0)
    assert math.isnan(float(embedding_cosine(torch.ones(1, 3))))  # no pair to compare


def test_watch_needs_two_consecutive_rows_and_reports_once():
    watch = CollapseWatch()
    high, low = COLLAPSE_COSINE + 0.01, COLLAPSE_COSINE - 0.2
    assert watch.observe(5, {LOG_KEY: high}) is None  # one row is not enough
    assert watch.observe(10, {LOG_KEY: low}) is None  # the run of high rows is broken
    assert watch.observe(15, {LOG_KEY: high}) is None
    found = watch.observe(20, {LOG_KEY: 0.999})
    assert found is not None and found.step == 20 and found.embedding_cos == 0.999
    assert watch.observe(25, {LOG_KEY: 0.999}) is None  # warned once
    assert watch.found.to_dict() == {"step": 20, "embedding_cos": 0.999, "threshold": COLLAPSE_COSINE,
                                     "recovered_at_step": None, "last_embedding_cos": 0.999}


def test_watch_records_a_recovery_and_a_relapse():
    watch = CollapseWatch()
    high, low = 0.99, 0.5
    for step in (5, 10):
        watch.observe(step, {LOG_KEY: high})
    assert watch.found.step == 10
    assert watch.observe(15, {LOG_KEY: low}) is None and not watch.recovered_now  # one low row is not a recovery
    watch.observe(20, {LOG_KEY: high})
    watch.observe(25, {LOG_KEY: low})
    assert watch.found.recovered_step is None
    watch.observe(30, {LOG_KEY: 0.4})
    assert watch.recovered_now and watch.found.recovered_step == 30  # the second consecutive low row
    assert "left the collapse" in watch.found.recovery_message("distill") and "step 30" in watch.found.recovery_message("distill")
    watch.observe(35, {LOG_KEY: 0.3})
    assert not watch.recovered_now and watch.found.recovered_step == 30  # reported once
    watch.observe(40, {LOG_KEY: high})
    assert watch.found.recovered_step == 30  # one high row is noise
    watch.observe(45, {LOG_KEY: 0.97})
    assert watch.found.to_dict() == {"step": 10, "embedding_cos": high, "threshold": COLLAPSE_COSINE,
                                     "recovered_at_step": None, "last_embedding_cos": 0.97}  # ended collapsed


def test_watch_ignores_methods_without_the_measure_and_nan():
    watch = CollapseWatch()
    for step in range(5):
        assert watch.observe(step, {"loss_part": 1.0}) is None
        assert watch.observe(step, {LOG_KEY: float("nan")}) is None
    assert watch.found is None


def test_watch_state_round_trips_through_a_checkpoint_dict():
    watch = CollapseWatch()
    watch.observe(5, {LOG_KEY: 0.99})
    resumed = CollapseWatch()
    resumed.load_state_dict(watch.state_dict())
    found = resumed.observe(10, {LOG_KEY: 0.99})  # the run of high rows continues across the resume
    assert found is not None and found.step == 10
    older = CollapseWatch()
    older.load_state_dict(None)  # a checkpoint from before the watch existed
    assert older.found is None
    for value in (0.3, 0.2):  # recovered, mid-way through a run of low rows
        resumed.observe(15, {LOG_KEY: value})
    again = CollapseWatch()
    again.load_state_dict(resumed.state_dict())
    assert again.found == resumed.found and again.state_dict() == resumed.state_dict()
    before_recovery_tracking = CollapseWatch()
    before_recovery_tracking.load_state_dict({"run": 3, "found": [10, 0.99]})  # a session-7 checkpoint
    assert before_recovery_tracking.found.to_dict()["recovered_at_step"] is None


class _CollapsingSimReg(SimReg):
    """SimReg whose reported embeddings are one vector for every image from its 4th step on (logged as step 4: rows count finished steps)."""

    name = "test-collapsing"

    def loss(self, inputs):
        loss, logs = super().loss(inputs)
        batch = inputs.images[0].shape[0]
        embeddings = torch.ones(batch, 8) if inputs.step >= 3 else torch.eye(batch, 8)
        return loss, {**logs, LOG_KEY: embedding_cosine(embeddings)}


@pytest.fixture
def collapsing_method():
    with temporary_methods(_CollapsingSimReg):
        yield _CollapsingSimReg.name


def test_a_collapsed_run_warns_once_and_records_the_step(tmp_path, tiny_teacher_file, log_lines, collapsing_method):
    from distillctl.cli import main

    out = tmp_path / "run"
    args = tiny_run_args(tiny_teacher_file, out, "--teacher-mode", "online", "--set", "train.log_every=2",
                         "--set", "train.checkpoint_every_steps=8", method=collapsing_method)
    assert main(args) in (None, 0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cosines = {row["step"]: row[LOG_KEY] for row in rows}
    assert cosines[2] == pytest.approx(0.0, abs=1e-6) and cosines[4] == pytest.approx(1.0, abs=1e-6)
    warnings = [line for line in log_lines if "embeddings have collapsed" in line]
    assert len(warnings) == 1 and "at step 6" in warnings[0]  # rows 4 and 6: the second consecutive one
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["collapse"] == {"step": 6, "embedding_cos": 1.0, "threshold": COLLAPSE_COSINE,
                                            "recovered_at_step": None, "last_embedding_cos": 1.0}
    checkpoint = sorted((out / "distill" / "checkpoints").glob("ckpt_*.pt"))[0]
    state = torch.load(checkpoint, weights_only=True)
    assert state["collapse"]["found"][0] == 6 and state["collapse"]["found"][1] == pytest.approx(1.0, abs=1e-5)


class _RecoveringSimReg(SimReg):
    """Reports one vector for every image at steps 3–6 only (log rows 4 and 6), distinct ones otherwise."""

    name = "test-recovering"

    def loss(self, inputs):
        loss, logs = super().loss(inputs)
        batch = inputs.images[0].shape[0]
        embeddings = torch.ones(batch, 8) if 3 <= inputs.step < 7 else torch.eye(batch, 8)
        return loss, {**logs, LOG_KEY: embedding_cosine(embeddings)}


def test_a_run_that_leaves_the_collapse_records_when(tmp_path, tiny_teacher_file, log_lines):
    from distillctl.cli import main

    out = tmp_path / "run"
    with temporary_methods(_RecoveringSimReg):
        args = tiny_run_args(tiny_teacher_file, out, "--teacher-mode", "online", "--set", "train.log_every=2",
                             method=_RecoveringSimReg.name)
        assert main(args) in (None, 0)
    assert len([line for line in log_lines if "embeddings have collapsed" in line]) == 1
    recovered = [line for line in log_lines if "left the collapse" in line]
    assert len(recovered) == 1 and "from step 10 on" in recovered[0]  # rows 8 and 10 are back below
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["collapse"] == {"step": 6, "embedding_cos": 1.0, "threshold": COLLAPSE_COSINE,
                                            "recovered_at_step": 10, "last_embedding_cos": 0.0}
    from distillctl import schemas

    schemas.validate(summary, "summary")


def test_a_healthy_run_records_no_collapse(tmp_path, tiny_teacher_file):
    """A real queue-contrast method reports the measure; digits on tiny-cnn do not collapse."""
    from distillctl.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--method", "mocov2", "--arch", "tiny-cnn", "--data", "builtin:digits", "--image-size", "16",
              "--epochs", "1", "--batch-size", "64", "--out", str(out), "--set", "train.log_every=5",
              "--set", "export.enabled=false", "--set", "method.params.queue_size=256",
              "--set", "method.params.flip=false", "--set", "eval.random_student=false"]) in (None, 0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cosines = [row[LOG_KEY] for row in rows if LOG_KEY in row]
    assert cosines and all(-1.0 <= c < COLLAPSE_COSINE for c in cosines)
    assert json.loads((out / "summary.json").read_text())["train"]["collapse"] is None
