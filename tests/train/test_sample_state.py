"""Per-sample state: updates by dataset index, checkpoint round trip through the method's state_dict, and
the trainer telling setup() the training-set size."""

from __future__ import annotations

import pytest
import torch

from distillctl.methods.sample_state import SampleState
from distillctl.train.loop import train
from tests.train.contract_helpers import probe_job


def test_update_and_lookup():
    state = SampleState(6, shape=(2,), fill=-1.0)
    state.update(torch.tensor([4, 1]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert state[torch.tensor([1, 4, 0])].tolist() == [[3.0, 4.0], [1.0, 2.0], [-1.0, -1.0]]
    assert state.written.tolist() == [False, True, False, False, True, False] and state.coverage() == 2 / 6
    with pytest.raises(IndexError):
        state.update(torch.tensor([6]), torch.zeros(1, 2))


def test_state_dict_round_trip():
    state = SampleState(5, dtype=torch.long, fill=-1)
    state.update(torch.tensor([0, 3]), torch.tensor([7, 9]))
    restored = SampleState(5, dtype=torch.long)
    restored.load_state_dict(state.state_dict())
    assert restored.values.tolist() == [7, -1, -1, 9, -1] and restored.written.equal(state.written)
    with pytest.raises(ValueError, match="training-set size"):
        SampleState(None)


@pytest.mark.slow
def test_trainer_sizes_checkpoints_and_resumes_the_table(tmp_path):
    """setup() learns the dataset size; the table is in the checkpoint and a resumed run ends equal."""
    full = probe_job(tmp_path / "full")
    train(full)
    seen = full.method.seen
    assert seen.num_samples == 64 and seen.coverage() == 1.0 and int(seen.values.max()) == 7  # 2 epochs × 4 steps
    part = probe_job(tmp_path / "part")
    part.train.max_steps = 5
    train(part)
    resumed = probe_job(tmp_path / "part")
    train(resumed)
    assert resumed.method.seen.values.equal(seen.values)
    for key, value in full.student.state_dict().items():
        assert value.equal(resumed.student.state_dict()[key]), key
