"""MLA decode over a paged latent KV cache: the specification of the FlashMLA-compatible kernels.

Cache layouts (one KV "head"; every token stores its compressed latent and its rope key):

* bf16: ``[num_blocks, 64, 1, 576]`` bf16, per token 512 latent ("nope") values then 64 rope values. The same layout
  in fp32 is accepted too, so a float32 model can keep its cache exact (for checking; kernels take bf16 or FP8).
* FP8: ``[num_blocks, 64, 1, 656]`` uint8 (float8_e4m3fn accepted as the same bytes), per token, little-endian:

  ======== ============================================================================
  bytes    content
  ======== ============================================================================
  0..511   512 latent values, e4m3, quantized in 4 groups of 128 (quant.py's per-token-group rules)
  512..527 4 float32 scales, scale j dequantizes latent values 128*j .. 128*j+127
  528..655 64 rope values, bf16, stored unquantized
  ======== ============================================================================

A sequence's token at position p lives in page ``block_table[seq, p // 64]``, row ``p % 64``. Only the first
``cache_seqlens[seq]`` positions of a sequence are ever read: other rows (free pages, the tail of the last page,
block-table entries past the last used page) may hold anything, NaN included, and never affect a result.

Attention (absorbed MLA): keys are the full 576-wide rows (dequantized for FP8), values their first ``head_dim_v`` (512)
columns, computed in fp32. Split-KV kernels compute partial results over key ranges and merge them with
``combine_splits``; the one-split case of that scheme *is* ``mla_decode_with_kvcache``.
"""

from __future__ import annotations

import torch

from dsv3.reference.quant import FP8_DTYPE, dequant_per_token_group, per_token_group_quant_fp8

PAGE_SIZE = 64
LATENT_DIM = 512
ROPE_DIM = 64
HEAD_DIM = LATENT_DIM + ROPE_DIM  # 576
LATENT_GROUP = 128
FP8_SCALE_OFFSET = LATENT_DIM  # 512: bytes of e4m3 latent before the scales
FP8_ROPE_OFFSET = FP8_SCALE_OFFSET + 4 * (LATENT_DIM // LATENT_GROUP)  # 528
FP8_ROW_BYTES = FP8_ROPE_OFFSET + 2 * ROPE_DIM  # 656


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ---------------------------------------------------------------------------------------------------------------------
# FP8 row format
# ---------------------------------------------------------------------------------------------------------------------


def pack_fp8_kv(latent_rope: torch.Tensor, ue8m0: bool = False) -> torch.Tensor:
    """Encode cache rows in the 656-byte FP8 format.

    latent_rope: bf16/fp16/fp32 [..., 576] (512 latent then 64 rope). The latent is quantized from its fp32 value
    with ``per_token_group_quant_fp8(group_size=128, ue8m0=ue8m0)``; the rope part is rounded to bf16 (exact for bf16
    input).
    Returns uint8 [..., 656].
    """
    _check(latent_rope.shape[-1] == HEAD_DIM, f"latent_rope: last dim must be {HEAD_DIM}, got {latent_rope.shape[-1]}")
    q, scale = per_token_group_quant_fp8(latent_rope[..., :LATENT_DIM], LATENT_GROUP, ue8m0)
    rope = latent_rope[..., LATENT_DIM:].to(torch.bfloat16)
    parts = [
        q.contiguous().view(torch.uint8),
        scale.contiguous().view(torch.uint8),
        rope.contiguous().view(torch.uint8),
    ]
    return torch.cat(parts, dim=-1)


def unpack_fp8_kv(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode 656-byte FP8 cache rows: uint8 (or e4m3) [..., 656] -> ``dtype`` [..., 576].

    Latent value i is ``float(e4m3[i]) * scale[i // 128]`` in fp32; rope values are the stored bf16 widened. The result
    is rounded once to ``dtype`` (fp32 keeps it exact).
    """
    _check(packed.shape[-1] == FP8_ROW_BYTES, f"packed: last dim must be {FP8_ROW_BYTES}, got {packed.shape[-1]}")
    raw = packed.contiguous().view(torch.uint8)
    q = raw[..., :FP8_SCALE_OFFSET].contiguous().view(FP8_DTYPE)
    scale = raw[..., FP8_SCALE_OFFSET:FP8_ROPE_OFFSET].contiguous().view(torch.float32)
    rope = raw[..., FP8_ROPE_OFFSET:].contiguous().view(torch.bfloat16)
    latent = dequant_per_token_group(q, scale, LATENT_GROUP)
    return torch.cat([latent, rope.float()], dim=-1).to(dtype)


def _cache_is_fp8(kv_cache: torch.Tensor) -> bool:
    """True for the 656-byte FP8 layout, False for the 576-wide bf16 one; anything else is rejected."""
    _check(
        kv_cache.dim() == 4 and kv_cache.shape[1] == PAGE_SIZE and kv_cache.shape[2] == 1,
        f"kv_cache: expected [num_blocks, {PAGE_SIZE}, 1, width], got {tuple(kv_cache.shape)}",
    )
    if kv_cache.dtype in (torch.bfloat16, torch.float32) and kv_cache.shape[3] == HEAD_DIM:
        return False
    if kv_cache.dtype in (torch.uint8, FP8_DTYPE) and kv_cache.shape[3] == FP8_ROW_BYTES:
        return True
    raise ValueError(
        f"kv_cache: expected bf16/fp32 [..., {HEAD_DIM}] or uint8 [..., {FP8_ROW_BYTES}], "
        f"got {kv_cache.dtype} [..., {kv_cache.shape[3]}]"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Writing the cache
# ---------------------------------------------------------------------------------------------------------------------


def compute_slot_mapping(block_table: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Cache slot of each new token: ``block_table[seq, pos // 64] * 64 + pos % 64``.

    block_table: int32 [b, max_blocks]; seq_ids: int [T] (row of block_table); positions: int [T] (position in that
    sequence, 0-based). Returns int64 [T].
    """
    seq = seq_ids.long()
    pos = positions.long()
    _check(bool((pos >= 0).all()), "positions: must be >= 0")
    _check(bool((pos < block_table.shape[1] * PAGE_SIZE).all()), "positions: beyond the block table's capacity")
    blocks = block_table[seq, pos // PAGE_SIZE].long()
    return blocks * PAGE_SIZE + pos % PAGE_SIZE


def append_kv_cache(
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    latent: torch.Tensor,
    rope: torch.Tensor,
    ue8m0: bool = False,
) -> None:
    """Write new tokens into their cache rows, in place.

    kv_cache: bf16 [num_blocks, 64, 1, 576] or uint8 [num_blocks, 64, 1, 656], contiguous.
    slot_mapping: int64 [T]; token t goes to flat row ``slot_mapping[t] = block_id * 64 + offset`` (vLLM convention);
    -1 skips the token (padding). Valid slots must be distinct and < num_blocks * 64.
    latent: [T, 512], rope: [T, 64], any float dtype. bf16 (fp32) cache: each row is ``cat(latent, rope)`` rounded to
    the cache's dtype.
    FP8 cache: each row is ``pack_fp8_kv(cat(latent, rope), ue8m0)``. No other byte of the cache changes.
    """
    fp8 = _cache_is_fp8(kv_cache)
    _check(kv_cache.is_contiguous(), "kv_cache: must be contiguous")
    t = slot_mapping.shape[0]
    _check(slot_mapping.dtype == torch.int64 and slot_mapping.dim() == 1, "slot_mapping: expected int64 [T]")
    _check(tuple(latent.shape) == (t, LATENT_DIM), f"latent: expected [{t}, {LATENT_DIM}], got {tuple(latent.shape)}")
    _check(tuple(rope.shape) == (t, ROPE_DIM), f"rope: expected [{t}, {ROPE_DIM}], got {tuple(rope.shape)}")
    num_slots = kv_cache.shape[0] * PAGE_SIZE
    _check(
        bool(((slot_mapping >= -1) & (slot_mapping < num_slots)).all()),
        f"slot_mapping: values must lie in [-1, {num_slots})",
    )
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    _check(slots.unique().numel() == slots.numel(), "slot_mapping: two tokens target the same slot")
    rows = torch.cat([latent[keep].float(), rope[keep].float()], dim=-1)
    if fp8:
        flat = kv_cache.view(torch.uint8).view(num_slots, FP8_ROW_BYTES)
        flat[slots] = pack_fp8_kv(rows, ue8m0)
    else:
        flat = kv_cache.view(num_slots, HEAD_DIM)
        flat[slots] = rows.to(kv_cache.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Reading the cache and attending
# ---------------------------------------------------------------------------------------------------------------------


def gather_kv(kv_cache: torch.Tensor, block_table_row: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """fp32 [end - start, 576]: the (dequantized) cache rows of positions [start, end) of one sequence.

    Reads exactly those rows and nothing else.
    """
    positions = torch.arange(start, end, device=kv_cache.device)
    return gather_kv_rows(kv_cache, block_table_row[positions // PAGE_SIZE], positions % PAGE_SIZE)


def gather_kv_rows(kv_cache: torch.Tensor, blocks: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """fp32 [n, 576]: the (dequantized) cache rows at slot slots[j] of page blocks[j] (int tensors [n])."""
    fp8 = _cache_is_fp8(kv_cache)
    rows = kv_cache[blocks.long(), slots, 0]
    return unpack_fp8_kv(rows) if fp8 else rows.float()


def _check_decode_args(
    q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor
) -> None:
    _cache_is_fp8(kv_cache)
    _check(q.dim() == 4 and q.shape[-1] == HEAD_DIM, f"q: expected [b, s_q, h, {HEAD_DIM}], got {tuple(q.shape)}")
    b = q.shape[0]
    _check(
        block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == b,
        f"block_table: expected int32 [{b}, max_blocks], got {block_table.dtype}{tuple(block_table.shape)}",
    )
    _check(
        cache_seqlens.dtype == torch.int32 and tuple(cache_seqlens.shape) == (b,),
        f"cache_seqlens: expected int32 [{b}], got {cache_seqlens.dtype}{tuple(cache_seqlens.shape)}",
    )
    capacity = block_table.shape[1] * PAGE_SIZE
    for i in range(b):
        seqlen = int(cache_seqlens[i])
        _check(0 <= seqlen <= capacity, f"cache_seqlens[{i}]={seqlen}: must lie in [0, {capacity}]")
        used = block_table[i, : (seqlen + PAGE_SIZE - 1) // PAGE_SIZE]
        _check(
            bool(((used >= 0) & (used < kv_cache.shape[0])).all()),
            f"block_table[{i}]: a used page id is outside [0, {kv_cache.shape[0]})",
        )


def _per_sequence(bound: int | torch.Tensor, b: int, name: str) -> list[int]:
    if isinstance(bound, torch.Tensor):
        _check(tuple(bound.shape) == (b,), f"{name}: expected an int or a [{b}] tensor, got {tuple(bound.shape)}")
        return [int(v) for v in bound]
    return [int(bound)] * b


def mla_decode_partial(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    start: int | torch.Tensor,
    end: int | torch.Tensor,
    head_dim_v: int = LATENT_DIM,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over the keys at positions [start, end) ∩ [0, seqlen) of its sequence.

    q: bf16 [b, s_q, h, 576]; kv_cache, block_table int32 [b, max_blocks], cache_seqlens int32 [b]: as in
    ``mla_decode_with_kvcache``. start, end: int, or int tensors [b] for per-sequence ranges.
    Causal masking uses absolute positions (query i of s_q sits at ``seqlen - s_q + i``), so it does not depend on
    where the split boundaries fall.

    Returns, normalized within the split:
      out f32 [b, s_q, h, head_dim_v] = Σ_j p_j v_j with p = softmax over the split's visible keys;
      lse f32 [b, h, s_q] = log Σ_j exp(scaled score_j) over those keys.
    A (query, head) that sees no key of the split gets out 0 and lse -inf.
    """
    _check_decode_args(q, kv_cache, block_table, cache_seqlens)
    b, s_q, h, d = q.shape
    _check(0 < head_dim_v <= d, f"head_dim_v={head_dim_v}: must lie in [1, {d}]")
    scale = d**-0.5 if softmax_scale is None else float(softmax_scale)
    starts = _per_sequence(start, b, "start")
    ends = _per_sequence(end, b, "end")
    out = torch.zeros(b, s_q, h, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, s_q), -float("inf"), dtype=torch.float32, device=q.device)
    for i in range(b):
        seqlen = int(cache_seqlens[i])
        lo, hi = max(starts[i], 0), min(ends[i], seqlen)
        if lo >= hi:
            continue
        keys = gather_kv(kv_cache, block_table[i], lo, hi)  # [n, 576]
        values = keys[:, :head_dim_v]  # [n, head_dim_v]
        scores = (q[i].float() @ keys.T) * scale  # [s_q, h, n]
        if causal:
            query_pos = torch.arange(s_q, device=q.device) + (seqlen - s_q)
            key_pos = torch.arange(lo, hi, device=q.device)
            visible = key_pos[None, :] <= query_pos[:, None]  # [s_q, n]
            scores = scores.masked_fill(~visible[:, None, :], -float("inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [s_q, h]; -inf where every key is masked
        empty = torch.isneginf(row_lse)[..., None]
        probs = torch.where(empty, 0.0, torch.exp(scores - row_lse[..., None]))
        out[i] = probs @ values
        lse[i] = row_lse.T
    return out, lse


def combine_splits(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split-KV partial results.

    outs: f32 [n, b, s_q, h, dv], each normalized within its split; lses: f32 [n, b, h, s_q], -inf for an empty split.
    Returns out f32 [b, s_q, h, dv] and lse f32 [b, h, s_q]:
      lse = log Σ_i exp(lse_i),  out = Σ_i exp(lse_i - lse) * out_i,
    where an empty split contributes nothing (its out_i is ignored, whatever it holds), and a (query, head) whose splits
    are all empty gets out 0 and lse +inf — the final "no keys" convention, so results are not meant to be re-combined.
    """
    _check(outs.dim() == 5 and lses.dim() == 4, "outs: expected [n, b, s_q, h, dv]; lses: expected [n, b, h, s_q]")
    _check(
        tuple(lses.shape) == (outs.shape[0], outs.shape[1], outs.shape[3], outs.shape[2]),
        f"lses: shape {tuple(lses.shape)} does not match outs {tuple(outs.shape)}",
    )
    lse = torch.logsumexp(lses.float(), dim=0)  # [b, h, s_q]
    split_empty = torch.isneginf(lses)
    weights = torch.where(split_empty, 0.0, torch.exp(lses.float() - lse))  # [n, b, h, s_q]
    weights = weights.transpose(2, 3)[..., None]  # [n, b, s_q, h, 1]
    contributions = torch.where(split_empty.transpose(2, 3)[..., None], 0.0, weights * outs.float())
    out = contributions.sum(dim=0)
    lse = torch.where(torch.isneginf(lse), float("inf"), lse)
    return out, lse


def mla_decode_with_kvcache(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int = LATENT_DIM,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA-style decode attention over a paged latent cache.

    q: bf16 [b, s_q, h, 576] (absorbed queries: 512 latent + 64 rope).
    kv_cache: bf16 [num_blocks, 64, 1, 576] or uint8 [num_blocks, 64, 1, 656] (the dtype selects the layout).
    block_table: int32 [b, max_blocks], page ids; only the first ceil(seqlen / 64) entries of a row are read.
    cache_seqlens: int32 [b], tokens in the cache per sequence, the s_q new ones included.
    head_dim_v: value width, the first head_dim_v columns of each row (512).
    softmax_scale: multiplies q·k before the softmax; default 576**-0.5.
    causal: query i of s_q sits at position ``seqlen - s_q + i`` and sees only keys at positions <= its own.

    Returns out q.dtype [b, s_q, h, head_dim_v] (softmax(scale * q·k) @ v in fp32, rounded once) and lse f32 [b, h, s_q]
    (natural log of Σ exp(scale * q·k)). A (query, head) that sees no key — seqlen 0, or a causal query placed before
    the first key — gets out 0 and lse +inf.
    """
    out, lse = mla_decode_partial(
        q, kv_cache, block_table, cache_seqlens, 0, cache_seqlens, head_dim_v, softmax_scale, causal
    )
    out, lse = combine_splits(out[None], lse[None])
    return out.to(q.dtype), lse
