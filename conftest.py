"""Shared pytest setup: the `cuda` marker skips only where no GPU is present; seeds are fixed."""

import os

import pytest
import torch

# Keep the JIT build out of the user's home when a test session runs in a sandbox or CI.
os.environ.setdefault("FASTATTN_BUILD_DIR", os.path.join(os.path.dirname(__file__), "build", "ext"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
