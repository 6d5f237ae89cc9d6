"""dsv3.reference.mla: FP8 row format, cache writes, decode vs naive float64 attention, split-KV combine invariance."""

from __future__ import annotations

import itertools
import math
import struct

import pytest
import torch

from dsv3.reference import (
    FP8_DTYPE,
    append_kv_cache,
    ceil_div,
    combine_splits,
    compute_slot_mapping,
    dequant_per_token_group,
    mla_decode_partial,
    mla_decode_with_kvcache,
    pack_fp8_kv,
    per_token_group_quant_fp8,
    unpack_fp8_kv,
    yarn_softmax_scale,
)
from dsv3.testing import assert_bitwise_equal, assert_close

NAN_BYTE = 0xFF  # NaN as e4m3fn, and 0xFFFFFFFF / 0xFFFF are NaN as float32 / bf16: a cache full of it is all NaN


def random_rows(n: int, gen: torch.Generator) -> torch.Tensor:
    """bf16 [n, 576] cache rows: latent with varied magnitudes per 128-group, rope of its own magnitude."""
    latent = torch.randn(n, 512, generator=gen) * torch.tensor([1.0, 0.05, 3.0, 0.5]).repeat_interleave(128)
    rope = torch.randn(n, 64, generator=gen) * 2
    return torch.cat([latent, rope], dim=-1).to(torch.bfloat16)


def empty_cache(num_blocks: int, fp8: bool) -> torch.Tensor:
    if fp8:
        return torch.full((num_blocks, 64, 1, 656), NAN_BYTE, dtype=torch.uint8)
    return torch.full((num_blocks, 64, 1, 576), float("nan"), dtype=torch.bfloat16)


def build_paged_case(seqlens: list[int], fp8: bool, seed: int):
    """A NaN-filled cache holding the given sequences on shuffled pages, written through append_kv_cache.

    Returns kv_cache, block_table, cache_seqlens and, per sequence, the float64 keys it must behave as.
    """
    gen = torch.Generator().manual_seed(seed)
    pages = [ceil_div(s, 64) for s in seqlens]
    num_blocks = sum(pages) + 3  # a few pages no sequence owns
    cache = empty_cache(num_blocks, fp8)
    # Entries past a sequence's last page point outside the cache: reading one would raise an IndexError.
    block_table = torch.full((len(seqlens), max(pages) + 2), num_blocks + 1000, dtype=torch.int32)
    free = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    for i, n in enumerate(pages):
        block_table[i, :n], free = free[:n], free[n:]

    rows = [random_rows(s, gen) for s in seqlens]
    seq_ids = torch.cat([torch.full((s,), i) for i, s in enumerate(seqlens)])
    positions = torch.cat([torch.arange(s) for s in seqlens])
    slots = compute_slot_mapping(block_table, seq_ids, positions)
    order = torch.randperm(slots.numel(), generator=gen)
    all_rows = torch.cat(rows)[order]
    append_kv_cache(cache, slots[order], all_rows[:, :512], all_rows[:, 512:])

    keys = [(unpack_fp8_kv(pack_fp8_kv(r)) if fp8 else r).double() for r in rows]
    return cache, block_table, torch.tensor(seqlens, dtype=torch.int32), keys


def naive_attention_f64(q: torch.Tensor, keys: list[torch.Tensor], scale: float, causal: bool):
    """Softmax attention of each query over its sequence's contiguous keys, in float64, one query at a time."""
    b, s_q, h, _ = q.shape
    out = torch.zeros(b, s_q, h, 512, dtype=torch.float64)
    lse = torch.full((b, h, s_q), float("inf"), dtype=torch.float64)
    for i in range(b):
        seqlen = keys[i].shape[0]
        for j in range(s_q):
            visible = keys[i][: seqlen - s_q + j + 1] if causal else keys[i]
            if visible.shape[0] == 0:
                continue
            scores = q[i, j].double() @ visible.T * scale  # [h, n]
            lse[i, :, j] = torch.logsumexp(scores, dim=-1)
            out[i, j] = torch.softmax(scores, dim=-1) @ visible[:, :512]
    return out, lse


# ---------------------------------------------------------------------------------------------------------------------
# FP8 row format
# ---------------------------------------------------------------------------------------------------------------------


def test_pack_fp8_kv_byte_layout():
    rows = random_rows(6, torch.Generator().manual_seed(0))
    rows[1, 128:256] = 0  # an all-zero group takes the amax floor
    rows[2, :128] *= 1e5  # beyond the e4m3 range before scaling
    packed = pack_fp8_kv(rows)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 656)

    q, scale = per_token_group_quant_fp8(rows[:, :512])
    assert_bitwise_equal(packed[:, :512].contiguous().view(FP8_DTYPE), q, name="latent bytes 0..511")
    assert_bitwise_equal(packed[:, 512:528].contiguous().view(torch.float32), scale, name="scale bytes 512..527")
    assert_bitwise_equal(
        packed[:, 528:656].contiguous().view(torch.bfloat16), rows[:, 512:], name="rope bytes 528..655"
    )
    # Scales are little-endian float32, scale j at byte 512 + 4j.
    assert list(struct.unpack("<4f", bytes(packed[2, 512:528].tolist()))) == scale[2].tolist()
    assert float(scale[1, 1]) == pytest.approx(1e-4 / 448)


def test_unpack_fp8_kv_round_trip_within_fp8_precision():
    rows = random_rows(64, torch.Generator().manual_seed(1)).view(4, 16, 576)  # leading dims are kept
    packed = pack_fp8_kv(rows)
    assert packed.shape == (4, 16, 656)
    restored = unpack_fp8_kv(packed)
    assert restored.dtype == torch.float32 and restored.shape == (4, 16, 576)
    q, scale = per_token_group_quant_fp8(rows[..., :512])
    assert_bitwise_equal(restored[..., :512], dequant_per_token_group(q, scale), name="latent dequant")
    assert_bitwise_equal(restored[..., 512:], rows[..., 512:].float(), name="rope")
    # e4m3 keeps 3 mantissa bits (relative error <= 2^-4); below its normal range steps are 2^-9 * scale.
    error = (restored[..., :512] - rows[..., :512].float()).abs()
    bound = rows[..., :512].float().abs() * 2**-4 + scale.repeat_interleave(128, dim=-1) * 2**-10
    assert bool((error <= bound).all())
    assert_bitwise_equal(unpack_fp8_kv(packed, torch.bfloat16), restored.to(torch.bfloat16), name="bf16 unpack")
    assert_bitwise_equal(unpack_fp8_kv(packed.view(FP8_DTYPE)), restored, name="e4m3-typed bytes")


def test_pack_fp8_kv_ue8m0_scales_are_powers_of_two():
    rows = random_rows(8, torch.Generator().manual_seed(2))
    packed = pack_fp8_kv(rows, ue8m0=True)
    scale = packed[:, 512:528].contiguous().view(torch.float32)
    mantissa, _ = torch.frexp(scale)
    assert bool((mantissa == 0.5).all())
    _, plain_scale = per_token_group_quant_fp8(rows[:, :512])
    assert bool(((scale >= plain_scale) & (scale < 2 * plain_scale)).all())
    restored = unpack_fp8_kv(packed)  # decoding needs no flag: the stored scale is whatever was used
    error = (restored[:, :512] - rows[:, :512].float()).abs()
    bound = rows[:, :512].float().abs() * 2**-4 + scale.repeat_interleave(128, dim=-1) * 2**-10
    assert bool((error <= bound).all())


# ---------------------------------------------------------------------------------------------------------------------
# Cache writes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True])
def test_append_kv_cache_writes_only_target_rows(fp8):
    gen = torch.Generator().manual_seed(3)
    cache = empty_cache(4, fp8)
    before = cache.clone()
    rows = random_rows(5, gen)
    slots = torch.tensor([3, -1, 64 * 2 + 63, 255, 70], dtype=torch.int64)
    append_kv_cache(cache, slots, rows[:, :512], rows[:, 512:])

    flat, flat_before = cache.view(256, -1), before.view(256, -1)
    written = slots[slots >= 0]
    expected = pack_fp8_kv(rows) if fp8 else rows
    assert_bitwise_equal(flat[written], expected[slots >= 0], name="written rows")
    untouched = torch.ones(256, dtype=torch.bool)
    untouched[written] = False
    assert torch.equal(flat[untouched].view(torch.uint8), flat_before[untouched].view(torch.uint8))


def test_append_kv_cache_rejects_bad_slots():
    cache = empty_cache(2, fp8=False)
    rows = random_rows(2, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="same slot"):
        append_kv_cache(cache, torch.tensor([5, 5]), rows[:, :512], rows[:, 512:])
    with pytest.raises(ValueError, match="slot_mapping"):
        append_kv_cache(cache, torch.tensor([0, 128]), rows[:, :512], rows[:, 512:])
    with pytest.raises(ValueError, match="kv_cache"):
        append_kv_cache(cache.half(), torch.tensor([0, 1]), rows[:, :512], rows[:, 512:])


def test_compute_slot_mapping():
    block_table = torch.tensor([[7, 2, 9], [4, 0, 1]], dtype=torch.int32)
    slots = compute_slot_mapping(block_table, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 130, 63, 64]))
    assert slots.dtype == torch.int64
    assert slots.tolist() == [7 * 64, 9 * 64 + 2, 4 * 64 + 63, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------------------------

SEQLENS = [0, 1, 64, 130, 77]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("s_q,causal,yarn_scale", [(1, False, False), (2, True, True), (3, False, True)])
def test_decode_matches_naive_attention(fp8, s_q, causal, yarn_scale):
    cache, block_table, seqlens, keys = build_paged_case(SEQLENS, fp8, seed=s_q)
    q = torch.randn(len(SEQLENS), s_q, 16, 576, generator=torch.Generator().manual_seed(10 + s_q)).to(torch.bfloat16)
    scale = yarn_softmax_scale() if yarn_scale else None
    out, lse = mla_decode_with_kvcache(q, cache, block_table, seqlens, softmax_scale=scale, causal=causal)
    assert out.dtype == torch.bfloat16 and out.shape == (len(SEQLENS), s_q, 16, 512)
    assert lse.dtype == torch.float32 and lse.shape == (len(SEQLENS), 16, s_q)

    expected_out, expected_lse = naive_attention_f64(q, keys, 576**-0.5 if scale is None else scale, causal)
    assert_close(out, expected_out, atol=1e-5, rtol=2**-8, max_diff=1e-5, name="out")
    assert_close(lse, expected_lse, atol=2e-5, rtol=1e-6, name="lse")
    # Sequence 0 is empty, and under causal masking query 0 of the 1-token sequence sits before its only key.
    assert bool((out[0] == 0).all()) and bool((lse[0] == float("inf")).all())
    if causal:
        assert bool((out[1, 0] == 0).all()) and bool((lse[1, :, 0] == float("inf")).all())


def test_decode_reads_nothing_beyond_seqlen():
    cache, block_table, seqlens, _ = build_paged_case([100], fp8=False, seed=5)
    q = torch.randn(1, 1, 4, 576, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    out, lse = mla_decode_with_kvcache(q, cache, block_table, seqlens)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    # A NaN in a row that is read does reach the output: the NaN-free result above is not luck.
    page, offset = int(block_table[0, 99 // 64]), 99 % 64
    cache[page, offset, 0, 0] = float("nan")
    out, _ = mla_decode_with_kvcache(q, cache, block_table, seqlens)
    assert bool(torch.isnan(out).all())


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("causal", [False, True])
def test_any_partition_of_the_keys_combines_to_the_full_decode(fp8, causal):
    cache, block_table, seqlens, _ = build_paged_case(SEQLENS, fp8, seed=7)
    gen = torch.Generator().manual_seed(8)
    s_q = 2
    q = torch.randn(len(SEQLENS), s_q, 8, 576, generator=gen).to(torch.bfloat16)
    full_out, full_lse = mla_decode_partial(q, cache, block_table, seqlens, 0, seqlens, causal=causal)
    expected_out, expected_lse = combine_splits(full_out[None], full_lse[None])

    # Per-sequence cut points, repeated ones giving empty splits; the last split runs past the sequence end.
    cuts = torch.stack([torch.sort(torch.randint(0, s + 1, (4,), generator=gen)).values for s in SEQLENS], dim=1)
    bounds = [torch.zeros(len(SEQLENS), dtype=torch.int64), *cuts, seqlens.long() + 50]
    outs, lses = [], []
    for start, end in itertools.pairwise(bounds):
        out, lse = mla_decode_partial(q, cache, block_table, seqlens, start, end, causal=causal)
        empty = torch.isneginf(lse).transpose(1, 2)[..., None]
        assert bool((out.masked_select(empty) == 0).all())
        outs.append(out.masked_fill(empty, float("nan")))  # an empty split's output must be ignored, not weighted by 0
        lses.append(lse)
    out, lse = combine_splits(torch.stack(outs), torch.stack(lses))
    assert_close(out, expected_out, atol=1e-6, rtol=1e-5, name="combined out")
    assert_close(lse, expected_lse, atol=1e-5, rtol=1e-6, name="combined lse")

    decode_out, decode_lse = mla_decode_with_kvcache(q, cache, block_table, seqlens, causal=causal)
    assert_bitwise_equal(decode_out, expected_out.to(torch.bfloat16), name="decode out")
    assert_bitwise_equal(decode_lse, expected_lse, name="decode lse")


def test_combine_splits_formula_and_empty_conventions():
    # One (batch, query, head): splits with lse 0 and log 3 weigh 1/4 and 3/4; a third split is empty.
    outs = torch.tensor([1.0, 5.0, float("nan")]).view(3, 1, 1, 1, 1).expand(3, 1, 1, 1, 2)
    lses = torch.tensor([0.0, math.log(3.0), -float("inf")]).view(3, 1, 1, 1)
    out, lse = combine_splits(outs, lses)
    assert_close(out, torch.full((1, 1, 1, 2), 4.0, dtype=torch.float64), rtol=1e-6, name="out")
    assert_close(lse, torch.full((1, 1, 1), math.log(4.0), dtype=torch.float64), rtol=1e-6, name="lse")
    # Every split empty: out 0 and lse +inf.
    out, lse = combine_splits(torch.full((2, 1, 1, 1, 2), float("nan")), torch.full((2, 1, 1, 1), -float("inf")))
    assert bool((out == 0).all()) and bool((lse == float("inf")).all())


def test_decode_rejects_bad_arguments():
    cache, block_table, seqlens, _ = build_paged_case([70], fp8=False, seed=9)
    q = torch.zeros(1, 1, 4, 576, dtype=torch.bfloat16)
    bad_table = block_table.clone()
    bad_table[0, 1] = cache.shape[0]  # the second page is used by a 70-token sequence
    with pytest.raises(ValueError, match="block_table"):
        mla_decode_with_kvcache(q, cache, bad_table, seqlens)
    with pytest.raises(ValueError, match="cache_seqlens"):
        mla_decode_with_kvcache(q, cache, block_table, torch.tensor([64 * block_table.shape[1] + 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens"):
        mla_decode_with_kvcache(q, cache, block_table, seqlens.long())
    with pytest.raises(ValueError, match="q"):
        mla_decode_with_kvcache(q[..., :512], cache, block_table, seqlens)
