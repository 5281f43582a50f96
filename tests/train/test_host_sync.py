"""No per-step host synchronisation: steps that are not log steps never read a tensor back to the host, and the
values logged at a log step are those of that step (``train/step_values.py``)."""

from __future__ import annotations

import collections
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from distillctl.errors import TrainingError
from distillctl.methods.common import FeatureQueue
from distillctl.train.step_values import StepValues

# Tensor methods that copy a value to the host (and so wait for the device): .item(), float(t), int(t), bool(t)
# (an ``if tensor:``), .tolist(), .cpu(), .numpy(); formatting and printing go through .item().
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
# The feature cache indexes its host shards with the loader's host index tensors (they never visit the device).
HOST_SIDE = ("/distillctl/cache/",)


class HostReads:
    """Counts host reads made while ``distillctl.train.loop.train`` runs, by (method, file, line)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import distillctl.train.loop as loop

        self.sites: collections.Counter = collections.Counter()
        self.active = False
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        original_train = loop.train

        def counted_train(job):
            self.active = True
            try:
                return original_train(job)
            finally:
                self.active = False
        monkeypatch.setattr(loop, "train", counted_train)

    def _counting(self, name: str, original):
        def wrapper(tensor, *args, **kwargs):
            if self.active:
                frames, frame = [], sys._getframe(1)
                while frame is not None:
                    frames.append((frame.f_code.co_filename, frame.f_lineno))
                    frame = frame.f_back
                if not any(part in path for path, _ in frames for part in HOST_SIDE):
                    caller = next(((p, n) for p, n in frames if "/distillctl/" in p), frames[0])
                    self.sites[(name, caller[0].split("/distillctl/")[-1], caller[1])] += 1
            return original(tensor, *args, **kwargs)
        return wrapper


def _args(method: str, teacher: Path, out: Path, steps: int, log_every: int, *extra: str) -> list[str]:
    common = ["--data", "builtin:digits", "--image-size", "16", "--epochs", "1", "--batch-size", "16", "--out", str(out),
              "--set", "data.crop_pct=1.0", "--set", "data.subset=160", "--set", "export.enabled=false",
              "--set", f"train.max_steps={steps}", "--set", f"train.log_every={log_every}",
              "--set", "train.checkpoint_every_minutes=null", *extra]
    if method == "dino":
        return ["pretrain", "--method", "dino", "--arch", "tiny-cnn", *common]
    return ["run", "--teacher", str(teacher), "--teacher-arch", "resnet18", "--student", "tiny-cnn", "--method", method,
            "--teacher-mode", "cached", "--set", "eval.teacher=false", "--set", "eval.random_student=false", *common]


def _run(args: list[str]) -> None:
    from distillctl.cli import main

    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code, f"exit {exc.code}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simreg", "seed", "dino"])
def test_steps_between_log_steps_read_nothing_back(method, tmp_path, tiny_teacher_file, monkeypatch):
    """A 6-step run makes exactly as many host reads as a 2-step run (the last step logs and checkpoints in
    both): the 4 extra steps, none of them a log step, read nothing back."""
    reads = HostReads(monkeypatch)
    counts = {}
    for steps in (2, 6):
        reads.sites.clear()
        _run(_args(method, tiny_teacher_file, tmp_path / f"{method}-{steps}", steps, log_every=100))
        counts[steps] = collections.Counter(reads.sites)
    extra = counts[6] - counts[2]
    assert sum(counts[2].values()) > 0  # the counter sees the log step's and checkpoint's reads
    assert not extra, f"host reads in non-log steps: {dict(extra)}"


def _metric_rows(path: Path) -> dict[int, dict]:
    drop = ("time", "img_per_s", "cpu_img_per_s")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {row["step"]: {k: v for k, v in row.items() if k not in drop} for row in rows}


@pytest.mark.slow
@pytest.mark.parametrize("method, grad_accum", [("seed", 1), ("simreg", 2)])
def test_log_rows_hold_the_values_of_their_step(method, grad_accum, tmp_path, tiny_teacher_file):
    """log_every=3 writes, at steps 3 and 6, exactly the rows log_every=1 writes there: a row is its step's loss
    and logs (mean over micro-batches), not a mean over the window."""
    rows = {}
    for every in (1, 3):
        out = tmp_path / f"every{every}"
        _run(_args(method, tiny_teacher_file, out, 6, every, "--set", f"train.grad_accum={grad_accum}"))
        rows[every] = _metric_rows(out / "metrics.jsonl")
    assert sorted(rows[1]) == [1, 2, 3, 4, 5, 6] and sorted(rows[3]) == [3, 6]
    assert rows[3][3] == rows[1][3] and rows[3][6] == rows[1][6]
    assert rows[1][3]["loss"] != rows[1][2]["loss"]  # the steps differ, so a window mean would show


def test_step_values_read_equals_float_of_each_value():
    values = StepValues(torch.device("cpu"), steps_per_epoch=10)
    losses = [torch.tensor(0.1, dtype=torch.float32), torch.tensor(0.7, dtype=torch.float32)]
    logs = [{"cos": torch.tensor(0.3, dtype=torch.bfloat16), "tau": 0.04},
            {"cos": torch.tensor(0.9, dtype=torch.bfloat16), "tau": 0.04}]
    for loss in losses:
        values.observe(loss, step=4)
    values.set_step(losses, logs)
    loss, means = values.read()
    assert loss == (float(losses[0]) + float(losses[1])) / 2
    assert means == {"cos": (float(logs[0]["cos"]) + float(logs[1]["cos"])) / 2, "tau": 0.04}
    values.set_step(losses[:1], logs[:1])
    assert values.read() == (float(losses[0]), {"cos": float(logs[0]["cos"]), "tau": 0.04})


def test_step_values_report_the_first_non_finite_loss():
    values = StepValues(torch.device("cpu"), steps_per_epoch=4)
    values.observe(torch.tensor(1.5), step=5)
    values.check_finite()
    values.observe(torch.tensor(math.inf), step=6)
    values.observe(torch.tensor(math.nan), step=7)
    values.set_step([torch.tensor(math.nan)], [{}])
    for read in (values.check_finite, values.read, values.raise_pending):
        with pytest.raises(TrainingError, match=r"non-finite loss \(inf\) at step 6 \(epoch 1\)") as info:
            read()
        assert info.value.exit_code == 1


def test_queue_keeps_its_pointer_on_the_host_and_after_a_restore():
    torch.manual_seed(0)
    queue = FeatureQueue(5, 2)
    queue.enqueue(torch.ones(3, 2), gather=False)
    restored = FeatureQueue(5, 2)
    restored.load_state_dict(queue.state_dict())
    for q in (queue, restored):
        q.enqueue(torch.full((4, 2), 2.0), gather=False)  # wraps: rows 3, 4, 0, 1
        assert int(q.ptr) == 2 and int(q.filled) == 5 and q.valid().shape[0] == 5
        assert q.data[:, 0].tolist() == [2.0, 2.0, 1.0, 2.0, 2.0]
