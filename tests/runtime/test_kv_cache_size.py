"""How large the KV cache is when its size is not given: fixed on the CPU, the rest of a memory share on a GPU."""

from __future__ import annotations

import pytest
import torch

from dsv3.runtime import LLM
from dsv3.runtime.kv_cache import CPU_CACHE_BYTES, default_cache_bytes, page_bytes


def test_a_gpu_cache_takes_what_is_left_of_its_share_of_the_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 << 30, 100 << 30))  # 40 GiB in use
    assert default_cache_bytes(torch.device("cuda"), 0.9) == 50 << 30
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.3: .*60.0 GiB of the device's 100.0 GiB are free"):
        default_cache_bytes(torch.device("cuda"), 0.3)


def test_the_cache_holds_the_pages_its_bytes_pay_for(tiny):
    assert default_cache_bytes(torch.device("cpu"), 0.9) == CPU_CACHE_BYTES
    page = page_bytes(LLM(tiny, dtype="float32", num_kv_pages=1).model, "auto")
    assert LLM(tiny, dtype="float32", kv_cache_bytes=3 * page + 5).cache.num_pages == 3
    # by default no more than max_num_seqs sequences of max_model_len tokens need
    assert LLM(tiny, dtype="float32", max_num_seqs=2, max_model_len=100).cache.num_pages == 4
