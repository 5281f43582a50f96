"""``main_first`` across two real gloo processes (CPU, no torchrun): whatever rank 0 raises reaches rank 1
as an exception instead of leaving it waiting at the broadcast."""

from __future__ import annotations

import datetime
import multiprocessing
import traceback

import pytest
import torch.distributed as dist

from distillctl.errors import InputError, TrainingError
from distillctl.train import distributed


def _raise_value_error() -> None:
    raise ValueError("boom")


def _raise_input_error() -> None:
    raise InputError("bad file x", hint="fix x")


def _return_seven() -> int:
    return 7


ACTIONS = {"value": _raise_value_error, "input": _raise_input_error, "ok": _return_seven}


def _worker(rank: int, store_path: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    for name, action in ACTIONS.items():  # one after the other: a lost failure would desynchronise the ranks
        try:
            outcome = ("ok", distributed.main_first(action))
        except BaseException as exc:  # noqa: BLE001 -- the outcome is the test's subject
            outcome = (type(exc).__name__, str(exc), getattr(exc, "hint", None), traceback.format_exc()[-300:])
        results.put((rank, name, outcome))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch: ~15 s on one core
def test_every_failure_on_rank_zero_reaches_rank_one(tmp_path):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(rank, str(tmp_path / "store"), results)) for rank in range(2)]
    for process in processes:
        process.start()
    outcomes = {(rank, name): outcome for rank, name, outcome in (results.get(timeout=120) for _ in range(6))}
    for process in processes:
        process.join(timeout=30)
    assert outcomes[0, "value"][:2] == ("ValueError", "boom")  # rank 0 keeps its own exception and traceback
    assert outcomes[1, "value"][:2] == ("TrainingError", "rank 0 failed: ValueError: boom")
    assert outcomes[0, "input"][:3] == outcomes[1, "input"][:3] == ("InputError", "bad file x", "fix x")
    assert outcomes[0, "ok"] == ("ok", 7) and outcomes[1, "ok"] == ("ok", None)  # the result stays on rank 0


def test_single_process_reraises_unchanged():
    with pytest.raises(ValueError, match="boom"):
        distributed.main_first(_raise_value_error)
    with pytest.raises(TrainingError, match="rank 0 could not write"):
        distributed.main_first(open, "/nonexistent-dir/x", "w")
