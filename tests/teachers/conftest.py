"""Fixtures for the teacher tests: an isolated DISTILLCTL_HOME and a local HTTP file server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from teacher_helpers import FileServer  # noqa: E402


@pytest.fixture(autouse=True)
def teacher_home(tmp_path, monkeypatch):
    """Every test gets its own cache and no mirror/offline/registry settings from the environment."""
    home = tmp_path / "home"
    monkeypatch.setenv("DISTILLCTL_HOME", str(home))
    for var in ("DISTILLCTL_MIRROR", "DISTILLCTL_REGISTRY", "DISTILLCTL_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DISTILLCTL_HTTP_TIMEOUT", "5")
    return home


@pytest.fixture
def server():
    files = FileServer()
    yield files
    files.close()
