"""MLA decode over a paged latent cache, its split-KV schedule, and cache appends vs dsv3.reference.mla."""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.reference import mla as ref
from dsv3.testing import assert_bitwise_equal, assert_close, calc_diff

SEQLENS = [0, 1, 63, 64, 65, 1100]  # empty, a single token, page edges, several pages


def _paged_cache(seqlens, num_blocks_extra=5, fp8=False, device="cpu"):
    """A cache holding random rows for `seqlens` on shuffled pages, NaN everywhere no sequence owns."""
    blocks_needed = [-(-s // 64) for s in seqlens]
    num_blocks = sum(blocks_needed) + num_blocks_extra
    max_blocks = max([*blocks_needed, 1])
    pages = torch.randperm(num_blocks)
    block_table = torch.full((len(seqlens), max_blocks), -7, dtype=torch.int32)  # unused entries: garbage
    rows = torch.randn(num_blocks, 64, ref.HEAD_DIM)
    valid = torch.zeros(num_blocks, 64, dtype=torch.bool)
    used = 0
    for i, (s, n) in enumerate(zip(seqlens, blocks_needed, strict=True)):
        block_table[i, :n] = pages[used : used + n].to(torch.int32)
        for j in range(n):
            valid[pages[used + j], : min(64, s - 64 * j)] = True
        used += n
    rows[~valid] = float("nan")  # unused pages and the tail of each last page
    if fp8:
        cache = ref.pack_fp8_kv(rows.nan_to_num(0.0)).reshape(num_blocks, 64, 1, ref.FP8_ROW_BYTES)
        cache.view(num_blocks, 64, ref.FP8_ROW_BYTES)[~valid] = 0xFF  # NaN bytes (e4m3 NaN, NaN scales)
    else:
        cache = rows.to(torch.bfloat16).reshape(num_blocks, 64, 1, ref.HEAD_DIM)
    return cache.to(device), block_table.to(device), torch.tensor(seqlens, dtype=torch.int32, device=device)


def _decode(q, cache, block_table, seqlens, causal, num_parts=None, softmax_scale=None):
    metadata, num_splits = dsv3.get_mla_metadata(seqlens, q.shape[1] * q.shape[2], 1, num_parts=num_parts)
    return dsv3.mla_decode_with_kvcache(
        q, cache, block_table, seqlens, 512, metadata, num_splits, softmax_scale=softmax_scale, causal=causal
    )


def _assert_matches_reference(q, cache, block_table, seqlens, causal, **kwargs):
    out, lse = _decode(q, cache, block_table, seqlens, causal, **kwargs)
    scale = kwargs.get("softmax_scale")
    r_out, r_lse = ref.mla_decode_with_kvcache(
        q.cpu(), cache.cpu(), block_table.cpu(), seqlens.cpu(), softmax_scale=scale, causal=causal
    )
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_close(out.cpu().float(), r_out.float(), atol=8e-3, rtol=8e-3, max_diff=1e-5, name="out")
    assert_close(lse.cpu(), r_lse, atol=1e-5, rtol=1e-5, name="lse")
    return out, lse


# ---- schedule -----------------------------------------------------------------------------------------------------


def _walk_schedule(metadata, num_splits, seqlens):
    """(sequence, first block, last block, split id) of every split, from the metadata rows."""
    splits = []
    for begin_seq, begin_block, end_seq, end_block, first_split, *rest in metadata.tolist():
        assert rest == [0, 0, 0]
        split = first_split
        for seq in range(begin_seq, end_seq + 1):
            blocks = -(-seqlens[seq] // 64)
            lo = begin_block if seq == begin_seq else 0
            hi = end_block if seq == end_seq else blocks
            if lo < hi:
                splits.append((seq, lo, hi, split))
                split += 1
    return splits


@pytest.mark.parametrize("num_parts", [1, 2, 7, 66])
@pytest.mark.parametrize("seqlens", [SEQLENS, [4096] * 32, [0, 0, 0], [5000, 1, 0, 64, 64], [129] * 100])
def test_schedule_covers_every_block_once(num_parts, seqlens):
    metadata, num_splits = dsv3.get_mla_metadata(torch.tensor(seqlens, dtype=torch.int32), 32, 1, num_parts)
    assert metadata.shape == (num_parts, 8) and num_splits.shape == (len(seqlens) + 1,)
    splits = _walk_schedule(metadata, num_splits, seqlens)
    offsets = num_splits.tolist()
    assert offsets[0] == 0 and offsets[-1] == len(splits) <= len(seqlens) + num_parts
    assert sorted(s[3] for s in splits) == list(range(len(splits)))  # split ids are distinct and dense
    for seq, seqlen in enumerate(seqlens):
        own = sorted((lo, hi, split) for s, lo, hi, split in splits if s == seq)
        assert [split for *_, split in own] == list(range(offsets[seq], offsets[seq + 1]))
        covered = [block for lo, hi, _ in own for block in range(lo, hi)]
        assert covered == list(range(-(-seqlen // 64)))  # every block once, in order
    costs = []
    for part, row in enumerate(metadata.tolist()):
        own = _walk_schedule(metadata[part : part + 1], num_splits, seqlens)
        costs.append(sum(hi - lo + 5 for _, lo, hi, _ in own))
        assert row[0] <= row[2] or costs[part] == 0
    total = sum(-(-s // 64) + 5 for s in seqlens if s)
    # balanced: no part but the last exceeds its share plus one split's overhead (the last takes the remainder)
    assert max(costs[:-1], default=0) <= -(-total // num_parts) + 5


def test_schedule_hand_example():
    metadata, num_splits = dsv3.get_mla_metadata(torch.tensor([65, 1000], dtype=torch.int32), 16, 1, num_parts=3)
    # costs: 2 + 5 and 16 + 5 = 28; share ceil(28 / 3) + 5 = 15 a part
    assert metadata[:, :5].tolist() == [[0, 0, 1, 3, 0], [1, 3, 1, 13, 2], [1, 13, 1, 16, 3]]
    assert num_splits.tolist() == [0, 1, 4]


# ---- decode -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [16, 32, 64, 128])
@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_decode_matches_reference(device, cpu_kernel, heads, s_q, causal):
    cache, block_table, seqlens = _paged_cache(SEQLENS, device=device)
    q = torch.randn(len(SEQLENS), s_q, heads, ref.HEAD_DIM).to(torch.bfloat16).to(device)
    out, lse = _assert_matches_reference(q, cache, block_table, seqlens, causal, num_parts=5)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("inf"))  # the empty sequence
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()  # no NaN from unused pages or page tails


@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_decode_fp8_cache_matches_reference(device, cpu_kernel, s_q, causal):
    # 16 heads: query tiles of 16 rows (s_q = 1; on a GPU the kernel that unpacks one page ahead) and 32
    cache, block_table, seqlens = _paged_cache(SEQLENS, fp8=True, device=device)
    q = torch.randn(len(SEQLENS), s_q, 16, ref.HEAD_DIM).to(torch.bfloat16).to(device)
    out, _ = _assert_matches_reference(q, cache, block_table, seqlens, causal, num_parts=4)
    assert torch.isfinite(out).all()


def test_fp8_nan_code_in_a_used_row_reaches_the_output_like_the_reference(device, cpu_kernel):
    # every e4m3 code is read as its value: a NaN code (0x7F) in a row a sequence owns makes that sequence's outputs
    # and lse NaN, as in the reference (a fast widening that reads it as 480 would pass a plausible wrong result on)
    cache, block_table, seqlens = _paged_cache([70, 130], fp8=True)
    cache.view(-1, 64, ref.FP8_ROW_BYTES)[int(block_table[1, 1]), 3, 200] = 0x7F  # sequence 1, token 67, dim 200
    q = torch.randn(2, 1, 16, ref.HEAD_DIM).to(torch.bfloat16)
    out, lse = _decode(q.to(device), cache.to(device), block_table.to(device), seqlens.to(device), False)
    r_out, r_lse = ref.mla_decode_with_kvcache(q, cache, block_table, seqlens)
    assert torch.isnan(r_out[1]).all() and torch.isnan(r_lse[1]).all()
    assert torch.equal(out.cpu().isnan(), r_out.isnan()) and torch.equal(lse.cpu().isnan(), r_lse.isnan())
    assert_close(out[0].cpu().float(), r_out[0].float(), atol=8e-3, rtol=8e-3, name="out of the other sequence")


def test_fp8_cache_is_within_fp8_tolerance_of_bf16_cache(device, cpu_kernel):
    seqlens = [300, 1000]
    bf16_cache, block_table, lengths = _paged_cache(seqlens, device=device)
    rows = bf16_cache.view(-1, ref.HEAD_DIM).float().nan_to_num(0.0)
    fp8_cache = ref.pack_fp8_kv(rows.cpu()).reshape(*bf16_cache.shape[:3], ref.FP8_ROW_BYTES).to(device)
    q = torch.randn(2, 1, 16, ref.HEAD_DIM).to(torch.bfloat16).to(device)
    out_bf16, lse_bf16 = _decode(q, bf16_cache, block_table, lengths, False)
    out_fp8, lse_fp8 = _decode(q, fp8_cache, block_table, lengths, False)
    assert calc_diff(out_fp8.float(), out_bf16.float()) < 2e-3
    assert_close(lse_fp8.cpu(), lse_bf16.cpu(), atol=0.05, rtol=0.02, name="lse")


@pytest.mark.parametrize("fp8", [False, True])
def test_partial_row_tiles_and_value_widths(device, cpu_kernel, fp8):
    # 3 x 20 query rows (16-row tiles with a partial last one) and head_dim_v 200 (value columns in 64-wide blocks
    # with a partial last one): out is the first 200 columns of the full-width result
    if device.type != "cpu":
        pytest.skip("edges of the CPU kernels' tiles")
    cache, block_table, seqlens = _paged_cache([130, 64, 7], fp8=fp8)
    q = torch.randn(3, 3, 20, ref.HEAD_DIM).to(torch.bfloat16)
    metadata, num_splits = dsv3.get_mla_metadata(seqlens, 60, 1, num_parts=3)
    out, lse = dsv3.mla_decode_with_kvcache(q, cache, block_table, seqlens, 200, metadata, num_splits, causal=True)
    r_out, r_lse = ref.mla_decode_with_kvcache(q, cache, block_table, seqlens, causal=True)
    assert out.shape == (3, 3, 20, 200)
    assert_close(out.float(), r_out[..., :200].float(), atol=8e-3, rtol=8e-3, max_diff=1e-5, name="out")
    assert_close(lse, r_lse, atol=1e-5, rtol=1e-5, name="lse")


@pytest.mark.parametrize("num_parts", [1, 3, 64])
def test_partition_does_not_change_the_result(device, cpu_kernel, num_parts):
    cache, block_table, seqlens = _paged_cache([700, 2000, 5], device=device)
    q = torch.randn(3, 2, 16, ref.HEAD_DIM).to(torch.bfloat16).to(device)
    _assert_matches_reference(q, cache, block_table, seqlens, True, num_parts=num_parts, softmax_scale=0.1352)


def test_causal_query_before_every_key_sees_nothing(device, cpu_kernel):
    cache, block_table, seqlens = _paged_cache([1, 3], device=device)
    q = torch.randn(2, 2, 16, ref.HEAD_DIM).to(torch.bfloat16).to(device)
    out, lse = _assert_matches_reference(q, cache, block_table, seqlens, True, num_parts=2)
    # seqlen 1 with s_q 2: the first query sits at position -1
    assert torch.all(out[0, 0] == 0) and torch.all(lse[0, :, 0] == float("inf")) and torch.isfinite(lse[0, :, 1]).all()


def _bad_input_case(device, seqlens, fp8=False):
    """(cache, block_table, seqlens, q, num_splits, decode): decode(**changes) runs the op with some arguments
    replaced."""
    cache, block_table, seqlens = _paged_cache(seqlens, fp8=fp8, device=device)
    q = torch.randn(len(seqlens), 1, 16, ref.HEAD_DIM).to(torch.bfloat16).to(device)
    metadata, num_splits = dsv3.get_mla_metadata(seqlens, 16, 1, num_parts=2)

    def decode(**changes):
        args = dict(q=q, kv_cache=cache, block_table=block_table, cache_seqlens=seqlens, head_dim_v=512)
        args.update(tile_scheduler_metadata=metadata, num_splits=num_splits)
        args.update(changes)
        return dsv3.mla_decode_with_kvcache(**args)

    return cache, block_table, seqlens, q, num_splits, decode


def test_decode_rejects_bad_arguments(device):
    """Shapes, dtypes, devices and alignment: checked on the host, so they raise on every device."""
    cache, block_table, seqlens, q, num_splits, decode = _bad_input_case(device, [100, 70])
    with pytest.raises(TypeError, match="q: expected dtype bfloat16"):
        decode(q=q.float())
    with pytest.raises(ValueError, match="q: expected head dim 576"):
        decode(q=q[..., :512].contiguous())
    with pytest.raises(ValueError, match=r"kv_cache: expected \[num_blocks, 64, 1, 576\]"):
        decode(kv_cache=cache[:, :32].contiguous())
    with pytest.raises(TypeError, match="block_table: expected dtype int32"):
        decode(block_table=block_table.long())
    with pytest.raises(ValueError, match=r"num_splits: expected shape \[3\]"):
        decode(num_splits=num_splits[:2].contiguous())
    with pytest.raises(ValueError, match="head_dim_v: expected at most 512"):
        decode(head_dim_v=576)
    with pytest.raises(ValueError, match="num_parts: expected a positive int"):
        dsv3.get_mla_metadata(seqlens, 16, 1, num_parts=0)


def test_decode_rejects_bad_contents(device):
    """Page ids and lengths the block table cannot hold, and a schedule made for other lengths, raise before any page
    is read (the CPU contract; on a GPU they cannot raise without a host synchronization: tests/cuda overrides this)."""
    cache, block_table, _, _, _, decode = _bad_input_case(device, [100, 70])
    bad_table = block_table.clone()
    bad_table[1, 1] = cache.shape[0]  # a used page id past the cache
    with pytest.raises(ValueError, match=r"block_table\[1, 1\]=.*outside the cache"):
        decode(block_table=bad_table)
    bad_table[1, 1] = -1
    with pytest.raises(ValueError, match=r"block_table\[1, 1\]=-1"):
        decode(block_table=bad_table)
    longer = torch.tensor([100, 200], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\]=200"):
        decode(cache_seqlens=longer)  # beyond the block table's 2 pages
    shorter = torch.tensor([100, 10], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="tile_scheduler_metadata|num_splits"):
        decode(cache_seqlens=shorter)  # stale schedule


# ---- appending to the cache ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_append_matches_reference_bitwise(device, fp8, dtype, ue8m0):
    num_blocks = 6
    width = ref.FP8_ROW_BYTES if fp8 else ref.HEAD_DIM
    if fp8:
        cache = torch.randint(0, 256, (num_blocks, 64, 1, width), dtype=torch.uint8)
    else:
        cache = torch.randn(num_blocks, 64, 1, width).to(torch.bfloat16)
    slots = torch.tensor([5, -1, 64 * 5 + 63, 0, 130], dtype=torch.int64)
    latent = (torch.randn(5, 512) * torch.logspace(-3, 3, 512)).to(dtype)
    latent[3] = 0.0  # an all-zero token
    rope = torch.randn(5, 64).to(dtype)
    expected = cache.clone()
    ref.append_kv_cache(expected, slots, latent, rope, ue8m0=ue8m0)
    actual = cache.to(device)
    dsv3.append_kv_cache(actual, slots.to(device), latent.to(device), rope.to(device), ue8m0=ue8m0)
    if fp8:
        assert torch.equal(actual.cpu(), expected)
    else:
        assert_bitwise_equal(actual.cpu(), expected, "kv_cache")


def test_append_then_decode_round_trip(device):
    cache = torch.zeros(4, 64, 1, ref.FP8_ROW_BYTES, dtype=torch.uint8, device=device)
    block_table = torch.tensor([[2, 0]], dtype=torch.int32, device=device)
    latent, rope = torch.randn(100, 512, device=device), torch.randn(100, 64, device=device)
    slots = torch.cat([torch.arange(128, 192), torch.arange(0, 36)]).to(device)  # page 2, then page 0
    dsv3.append_kv_cache(cache, slots, latent, rope)
    q = torch.randn(1, 1, 16, ref.HEAD_DIM).to(torch.bfloat16).to(device)
    seqlens = torch.tensor([100], dtype=torch.int32, device=device)
    out, _ = _decode(q, cache, block_table, seqlens, False)
    exact = torch.cat([latent, rope], -1).to(torch.bfloat16).reshape(1, 100, 1, ref.HEAD_DIM)
    # the same rows in a bf16 cache laid out contiguously
    bf16_cache = torch.zeros(2, 64, 1, ref.HEAD_DIM, dtype=torch.bfloat16, device=device)
    bf16_cache.view(-1, ref.HEAD_DIM)[:100] = exact.reshape(100, ref.HEAD_DIM)
    r_out, _ = _decode(q, bf16_cache, torch.tensor([[0, 1]], dtype=torch.int32, device=device), seqlens, False)
    assert calc_diff(out.float(), r_out.float()) < 2e-3


def test_append_rejects_bad_slots(device):
    cache = torch.zeros(2, 64, 1, ref.HEAD_DIM, dtype=torch.bfloat16, device=device)
    latent, rope = torch.randn(2, 512, device=device), torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match=r"slot_mapping\[1\]=128: expected -1 or 0..127"):
        dsv3.append_kv_cache(cache, torch.tensor([0, 128], device=device), latent, rope)
    with pytest.raises(ValueError, match="slot 3 is written by two tokens"):
        dsv3.append_kv_cache(cache, torch.tensor([3, 3], device=device), latent, rope)
    with pytest.raises(TypeError, match="slot_mapping: expected dtype int64"):
        dsv3.append_kv_cache(cache, torch.tensor([0, 1], dtype=torch.int32, device=device), latent, rope)
    with pytest.raises(TypeError, match="rope: expected dtype float32"):
        dsv3.append_kv_cache(cache, torch.tensor([0, 1], device=device), latent, rope.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"latent: expected shape \[2, 512\]"):
        dsv3.append_kv_cache(cache, torch.tensor([0, 1], device=device), latent[:, :256].contiguous(), rope)


def test_registered_as_torch_custom_ops(device):
    cache, block_table, seqlens = _paged_cache([100, 70], device=device)
    q = torch.randn(2, 1, 16, ref.HEAD_DIM).to(torch.bfloat16).to(device)
    metadata, num_splits = dsv3.get_mla_metadata(seqlens, 16, 1, num_parts=2)
    args = (q, cache, block_table, seqlens, metadata, num_splits, 512, 0.1, False)
    torch.library.opcheck(torch.ops.dsv3.mla_decode_with_kvcache.default, args, test_utils=("test_faketensor",))
