"""The expert-parallel packing kernel tests of tests/ep/test_pack_kernels.py, run on the GPU (tests/cuda/conftest.py
sets `device`)."""

from __future__ import annotations

from tests.ep.test_pack_kernels import *  # noqa: F403  (the same tests, collected again with device=cuda)
