"""The paged latent KV cache of a model: one [num_pages, 64, 1, row] tensor per layer (MTP blocks included), all
indexed by the same page ids, so one page allocator serves every layer."""

from __future__ import annotations

import torch

from dsv3.model.transformer import DeepseekV3
from dsv3.reference.mla import FP8_ROW_BYTES, HEAD_DIM, PAGE_SIZE
from dsv3.runtime.page_allocator import PageAllocator

# "auto": the model's dtype (fp32 for a float32 model, which keeps the cache exact; bf16 for a bfloat16 one).
# "fp8": the 656-byte rows (512 e4m3 latent values with 4 fp32 scales, then the rope part in bf16).
KV_CACHE_DTYPES = ("auto", "bf16", "fp8")


class PagedKVCache:
    def __init__(self, model: DeepseekV3, kv_cache_dtype: str, num_pages: int):
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: expected one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        self.dtype_name = kv_cache_dtype
        dtype = torch.bfloat16 if kv_cache_dtype == "bf16" else None
        self.layers = model.allocate_kv_cache(num_pages, fp8=kv_cache_dtype == "fp8", dtype=dtype)
        self.allocator = PageAllocator(num_pages)

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * PAGE_SIZE


def page_bytes(model: DeepseekV3, kv_cache_dtype: str) -> int:
    """Bytes one page takes over every layer's cache."""
    if kv_cache_dtype == "fp8":
        row = FP8_ROW_BYTES
    else:
        element = 2 if kv_cache_dtype == "bf16" else model.dtype.itemsize
        row = HEAD_DIM * element
    return PAGE_SIZE * row * (len(model.layers) + len(model.mtp))


CPU_CACHE_BYTES = 1 << 28  # the cache's default size on the CPU


def default_cache_bytes(device: torch.device, gpu_memory_utilization: float) -> int:
    """The cache's size when none is given. On a GPU: what is left of gpu_memory_utilization of the device's memory
    with the model loaded (the rest stays free for activations, CUDA graphs and communication buffers, and for what
    other processes hold); raises if nothing is. On the CPU: CPU_CACHE_BYTES."""
    if device.type != "cuda":
        return CPU_CACHE_BYTES
    torch.cuda.empty_cache()  # blocks freed while loading are the cache's to take
    free, total = torch.cuda.mem_get_info(device)
    budget = int(free - (1 - gpu_memory_utilization) * total)
    if budget <= 0:
        raise ValueError(
            f"gpu_memory_utilization={gpu_memory_utilization}: with the model loaded, {free / 2**30:.1f} GiB of the "
            f"device's {total / 2**30:.1f} GiB are free, none of it within that share for the KV cache (raise it, or "
            f"give kv_cache_bytes)"
        )
    return budget
