"""Intra-op thread choice: explicit key, then OMP_NUM_THREADS, then cores / local processes - loader workers."""

from __future__ import annotations

import os

import pytest

from distillctl.train import threads as threads_mod
from distillctl.train.threads import choose_threads


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(threads_mod, "available_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def test_auto_divides_the_cores_among_local_processes_and_workers(four_cores, monkeypatch):
    assert choose_threads(None).threads == 4
    assert choose_threads(None, loader_workers=1).threads == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    choice = choose_threads(None, loader_workers=1)
    assert (choice.threads, choice.source, choice.local_world) == (1, "auto", 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # more processes than cores: still one thread each
    assert choose_threads(None, loader_workers=2).threads == 1


def test_omp_num_threads_is_honoured_and_the_key_wins(four_cores, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert (choose_threads(None).threads, choose_threads(None).source) == (3, "OMP_NUM_THREADS")
    assert (choose_threads(2).threads, choose_threads(2).source) == (2, "train.threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "garbage")  # ignored, not a crash
    assert choose_threads(None).source == "auto"


def test_available_cores_follows_the_affinity_mask():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no affinity API")
    assert threads_mod.available_cores() == len(os.sched_getaffinity(0))
