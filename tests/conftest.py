from __future__ import annotations

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    """The device the op tests run on; tests/cuda/conftest.py overrides it to run the same tests on the GPU."""
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
