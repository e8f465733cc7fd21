"""Shared by the device loop's tests."""

from pathlib import Path

import pytest

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file


@pytest.fixture(scope="session")
def start(tmp_path_factory) -> Path:
    """The checkpoint the loop starts from: GpreBN-adapted once on 128 clean images (test files that need
    another start define their own `start`)."""
    path = tmp_path_factory.mktemp("loop") / "start.safetensors"
    adapt_to_file("builtin:small_resnet", "synthetic:clean:n=128", path, AdaptConfig(batch_size=32))
    return path
