"""Fixtures for the feature-cache tests (helpers live in cache_helpers.py)."""

from __future__ import annotations

import pytest

from cache_helpers import write_image_folder
from distillctl.data.datasets import ImageDataset, open_dataset


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> ImageDataset:
    root = write_image_folder(tmp_path_factory.mktemp("imagefolder"))
    return open_dataset(root)


@pytest.fixture(scope="session")
def digits() -> ImageDataset:
    return open_dataset("builtin:digits").subset(range(48), name="digits48")
