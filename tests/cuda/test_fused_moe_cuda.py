"""The fused-experts tests of tests/test_fused_moe.py on the GPU (tests/cuda/conftest.py sets `device`)."""

from tests.test_fused_moe import *  # noqa: F403
