"""MLA decode attention over a paged latent KV cache (FlashMLA-compatible calls), and appending to that cache.

Semantics are those of dsv3.reference.mla. The split-KV partition comes from get_mla_metadata, computed by the same
C++ code (csrc/include/dsv3/mla_schedule.h) for the CPU and the GPU (there by a small kernel, without a host sync).

Inputs whose validity depends on tensor contents (page ids, sequence lengths, a schedule computed for other lengths,
cache slots) raise ValueError on the CPU. CUDA kernels never synchronize with the host to check them: they never
access memory out of bounds either, and give NaN out/lse for an affected sequence (decode) or skip the token
(append) instead.
"""

from __future__ import annotations

import torch

from dsv3.ops.extension import DTYPE_CODES, custom_op, run_kernel
from dsv3.ops.tensor_checks import check_aligned, check_positive_int, check_tensor
from dsv3.reference.mla import FP8_ROW_BYTES, HEAD_DIM, LATENT_DIM, PAGE_SIZE, ROPE_DIM
from dsv3.reference.quant import FP8_DTYPE

METADATA_INTS = 8


def _check_cache(kv_cache: torch.Tensor) -> bool:
    """True for the 656-byte FP8 layout, False for bf16; rejects anything else."""
    check_tensor(kv_cache, "kv_cache", dtypes=(torch.bfloat16, torch.uint8, FP8_DTYPE), ndim=4)
    fp8 = kv_cache.dtype != torch.bfloat16
    width = FP8_ROW_BYTES if fp8 else HEAD_DIM
    if tuple(kv_cache.shape[1:]) != (PAGE_SIZE, 1, width):
        raise ValueError(
            f"kv_cache: expected [num_blocks, {PAGE_SIZE}, 1, {width}] for {kv_cache.dtype}, got {list(kv_cache.shape)}"
        )
    return fp8


def default_num_parts(device: torch.device, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """Split-KV parts: on the CPU two per thread (load balance); on a GPU, FlashMLA's SMs / kv heads / q tiles."""
    if device.type == "cuda":
        from dsv3.ops.extension import cuda_index, num_sms

        q_tiles = -(-num_q_tokens_per_head_k // 64)
        return max(num_sms(cuda_index(device)) // num_heads_k // q_tiles, 1)
    return 2 * torch.get_num_threads()


def get_mla_metadata(
    cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int, num_parts: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV schedule for mla_decode_with_kvcache.

    cache_seqlens: int32 [b]; num_q_tokens_per_head_k: s_q * h_q / h_kv; num_heads_k: 1 for MLA.
    num_parts: how many pieces the batch's KV blocks are cut into (default: see default_num_parts).
    Returns (tile_scheduler_metadata int32 [num_parts, 8], num_splits int32 [b + 1]): each part's range of
    (sequence, 64-token block), and the prefix sum of every sequence's number of splits.
    """
    check_tensor(cache_seqlens, "cache_seqlens", dtypes=(torch.int32,), ndim=1)
    check_positive_int(num_q_tokens_per_head_k, "num_q_tokens_per_head_k")
    check_positive_int(num_heads_k, "num_heads_k")
    if num_parts is None:
        num_parts = default_num_parts(cache_seqlens.device, num_q_tokens_per_head_k, num_heads_k)
    check_positive_int(num_parts, "num_parts")
    batch = cache_seqlens.shape[0]
    metadata = torch.empty(num_parts, METADATA_INTS, dtype=torch.int32, device=cache_seqlens.device)
    num_splits = torch.empty(batch + 1, dtype=torch.int32, device=cache_seqlens.device)
    run_kernel(
        "mla_schedule", cache_seqlens.device, cache_seqlens.data_ptr(), metadata.data_ptr(), num_splits.data_ptr(),
        batch, num_parts,
    )  # fmt: skip
    return metadata, num_splits


def _decode_shapes(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    metadata: torch.Tensor,
    num_splits: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, s_q, h, _ = q.shape
    return q.new_empty(b, s_q, h, head_dim_v), q.new_empty(b, h, s_q, dtype=torch.float32)


@custom_op("mla_decode_with_kvcache", fake=_decode_shapes)
def _mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    metadata: torch.Tensor,
    num_splits: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_aligned(
        q=q, kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens, metadata=metadata,
        num_splits=num_splits,
    )  # fmt: skip
    b, s_q, h, _ = q.shape
    parts = metadata.shape[0]
    out = q.new_empty(b, s_q, h, head_dim_v)
    lse = q.new_empty(b, h, s_q, dtype=torch.float32)
    # partial results of sequences cut into several splits: at most b + parts splits exist
    partial_out = q.new_empty(b + parts, s_q, h, head_dim_v, dtype=torch.float32)
    partial_lse = q.new_empty(b + parts, h, s_q, dtype=torch.float32)
    run_kernel(
        "mla_decode", q.device, q.data_ptr(), kv_cache.data_ptr(), kv_cache.dtype != torch.bfloat16,
        block_table.data_ptr(), cache_seqlens.data_ptr(), metadata.data_ptr(), num_splits.data_ptr(), out.data_ptr(),
        lse.data_ptr(), partial_out.data_ptr(), partial_lse.data_ptr(), b, s_q, h, kv_cache.shape[0],
        block_table.shape[1], parts, head_dim_v, softmax_scale, causal,
    )  # fmt: skip
    return out, lse


def mla_decode_with_kvcache(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of absorbed MLA queries over a paged latent cache.

    q: bf16 [b, s_q, h, 576]; kv_cache: bf16 [num_blocks, 64, 1, 576] or the FP8 layout uint8 [num_blocks, 64, 1, 656];
    block_table: int32 [b, max_blocks]; cache_seqlens: int32 [b] (the s_q new tokens included); head_dim_v: 512;
    tile_scheduler_metadata, num_splits: from get_mla_metadata(cache_seqlens, ...); softmax_scale: default 576**-0.5;
    causal: query i of s_q sits at position seqlen - s_q + i and sees keys up to it.
    Returns out bf16 [b, s_q, h, head_dim_v] and lse f32 [b, h, s_q]; a query that sees no key gets out 0, lse +inf.
    Only the first cache_seqlens[i] rows of a sequence are read; a used block_table entry outside the cache, a length
    beyond the block table or a stale schedule raises on the CPU and makes that sequence's out and lse NaN on a GPU.
    """
    check_tensor(q, "q", dtypes=(torch.bfloat16,), ndim=4)
    b, d = q.shape[0], q.shape[3]
    if d != HEAD_DIM:
        raise ValueError(f"q: expected head dim {HEAD_DIM} (512 latent + 64 rope), got {d}")
    _check_cache(kv_cache)
    device = q.device
    if kv_cache.device != device:
        raise ValueError(f"kv_cache: expected a tensor on {device}, got one on {kv_cache.device}")
    check_tensor(block_table, "block_table", dtypes=(torch.int32,), shape=(b, None), device=device)
    check_tensor(cache_seqlens, "cache_seqlens", dtypes=(torch.int32,), shape=(b,), device=device)
    metadata_shape = (None, METADATA_INTS)
    check_tensor(
        tile_scheduler_metadata, "tile_scheduler_metadata", dtypes=(torch.int32,), shape=metadata_shape, device=device
    )
    check_tensor(num_splits, "num_splits", dtypes=(torch.int32,), shape=(b + 1,), device=device)
    check_positive_int(head_dim_v, "head_dim_v")
    if head_dim_v > LATENT_DIM:
        raise ValueError(f"head_dim_v: expected at most {LATENT_DIM}, got {head_dim_v}")
    if tile_scheduler_metadata.shape[0] == 0:
        raise ValueError("tile_scheduler_metadata: expected at least one part")
    scale = HEAD_DIM**-0.5 if softmax_scale is None else float(softmax_scale)
    return _mla_decode(
        q, kv_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, head_dim_v, scale, bool(causal)
    )


def _no_output(*args: object) -> None:
    return None


@custom_op("append_kv_cache", fake=_no_output, mutates_args=("kv_cache",))
def _append_kv_cache(
    kv_cache: torch.Tensor, slot_mapping: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor, ue8m0: bool
) -> None:
    check_aligned(kv_cache=kv_cache, slot_mapping=slot_mapping, latent=latent, rope=rope)
    run_kernel(
        "mla_append_kv", kv_cache.device, kv_cache.data_ptr(), kv_cache.dtype != torch.bfloat16,
        slot_mapping.data_ptr(), latent.data_ptr(), rope.data_ptr(), DTYPE_CODES[latent.dtype], latent.shape[0],
        kv_cache.shape[0], ue8m0,
    )  # fmt: skip


def append_kv_cache(
    kv_cache: torch.Tensor, slot_mapping: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor, ue8m0: bool = False
) -> None:
    """Write new tokens' latent [T, 512] and rope [T, 64] (bf16 or fp32) into their cache rows, in place.

    slot_mapping: int64 [T], block_id * 64 + offset, -1 skips a token; two tokens may not share a slot (on a GPU,
    slots outside the cache are skipped instead of raising).
    bf16 cache: rows are the values rounded to bf16. FP8 cache: 512 e4m3 latent values with one fp32 scale per 128
    (per_token_group_quant_fp8 rules, power-of-two scales with ue8m0), then the rope part as bf16.
    """
    _check_cache(kv_cache)
    t = latent.shape[0] if isinstance(latent, torch.Tensor) and latent.dim() == 2 else None
    device = kv_cache.device
    check_tensor(latent, "latent", dtypes=(torch.bfloat16, torch.float32), shape=(t, LATENT_DIM), device=device)
    check_tensor(rope, "rope", dtypes=(latent.dtype,), shape=(t, ROPE_DIM), device=device)
    check_tensor(slot_mapping, "slot_mapping", dtypes=(torch.int64,), shape=(t,), device=device)
    _append_kv_cache(kv_cache, slot_mapping, latent, rope, bool(ue8m0))
