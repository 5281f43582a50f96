"""``teacher.source: scratch``: a random-init teacher for co-trained methods; deterministic, needs an arch, leaves the
global RNG alone, and is refused for methods that keep their teacher frozen."""

from __future__ import annotations

import pytest
import torch

from distillctl.errors import UsageError
from distillctl.teachers.scratch import scratch_teacher, weights_sha256
from tests.conftest import run_cli


def test_scratch_teacher_is_seeded_and_identified_by_its_weights() -> None:
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    first = scratch_teacher("tiny-cnn", seed=0, image_size=16)
    assert torch.rand(1).equal(expected_next)  # built in a forked RNG
    again, other = scratch_teacher("tiny-cnn", seed=0, image_size=16), scratch_teacher("tiny-cnn", seed=1, image_size=16)
    assert first.sha256 == again.sha256 == weights_sha256(again.backbone) != other.sha256
    assert first.arch == "tiny-cnn" and first.projection is None and first.source == "scratch"
    assert first.embed_dim == first.backbone(torch.zeros(2, 3, 16, 16)).shape[1]
    torch.manual_seed(0)
    student = __import__("timm").create_model("test_resnet", num_classes=0)  # the student of a run with seed 0
    assert weights_sha256(student) != first.sha256  # teacher drawn from seed + 1: not a copy of the student


def test_scratch_needs_an_architecture() -> None:
    with pytest.raises(UsageError, match="teacher.arch"):
        scratch_teacher(None, seed=0, image_size=16)


def test_scratch_is_refused_for_a_frozen_teacher(tmp_path) -> None:
    result = run_cli("run", "--teacher", "scratch", "--teacher-arch", "tiny-cnn", "--student", "tiny-cnn", "--method",
                     "simreg", "--data", "builtin:digits", "--image-size", "16", "--epochs", "1", "--batch-size", "16",
                     "--out", str(tmp_path / "run"), "--set", "data.subset=32")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "does not train its teacher" in result.stderr
