"""The layer op tests of tests/test_layers.py, run on the GPU (tests/cuda/conftest.py sets `device`)."""

from __future__ import annotations

from tests.test_layers import *  # noqa: F403  (the same tests, collected again with device=cuda)
