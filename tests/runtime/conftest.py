from __future__ import annotations

import pytest
import torch

from dsv3.model.tiny import make_tiny_checkpoint
from dsv3.runtime import LLM


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-runtime"))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tiny model's ops are too small to share among threads; on a loaded machine, threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llm(tiny):
    """float32 (exact weights, fp32 cache): the configuration whose greedy output the tests pin down."""
    return LLM(tiny, dtype="float32", num_kv_pages=48)


@pytest.fixture(scope="session")
def llm_mtp(tiny):
    return LLM(tiny, dtype="float32", speculative="mtp", num_kv_pages=48)
