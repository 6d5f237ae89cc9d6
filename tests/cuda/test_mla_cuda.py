"""The MLA tests of tests/test_mla.py on the GPU (tests/cuda/conftest.py sets `device`), plus GPU-only cases: the
device schedule equals the CPU's, the sm_90a decode kernel against the reference and the CPU kernel over every query
tile width, NaN-poisoned caches, bad input flagged without out-of-bounds access, and CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.reference import mla as ref
from dsv3.testing import assert_bitwise_equal, assert_close, calc_diff
from tests.conftest import skip_if_smoke_failed
from tests.test_mla import *  # noqa: F403  (the same tests, collected again with device=cuda)
from tests.test_mla import SEQLENS, _assert_matches_reference, _bad_input_case, _decode, _paged_cache

CUDA = torch.device("cuda")


# ---- overrides: where the GPU contract differs from the CPU one ----------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True])
def test_decode_rejects_bad_contents(device, fp8):
    # Errors in tensor contents cannot raise without a host sync, so the kernel turns exactly the affected sequence's
    # results into NaN (and never reads out of bounds). 16 heads: the FP8 kernel that unpacks one page ahead, across
    # the sequences of a part, so a page it could not load must poison its own sequence only.
    cache, block_table, _, _, _, decode = _bad_input_case(device, [100, 70, 130], fp8=fp8)
    good_out, good_lse = decode()

    def assert_only_sequence_poisoned(result, seq, same_schedule=True):
        out, lse = result
        assert torch.isnan(out[seq]).all() and torch.isnan(lse[seq]).all(), f"sequence {seq} not flagged"
        others = [i for i in range(3) if i != seq]
        if same_schedule:
            assert torch.equal(out[others], good_out[others]) and torch.equal(lse[others], good_lse[others])
        else:  # other split points: the same values up to the summation order
            assert_close(out[others].cpu().float(), good_out[others].cpu().float(), atol=1e-2, rtol=1e-2, name="out")
            assert_close(lse[others].cpu(), good_lse[others].cpu(), atol=1e-5, rtol=1e-5, name="lse")

    for bad_page in (cache.shape[0], 1 << 30, -1):
        bad_table = block_table.clone()
        bad_table[1, 1] = bad_page
        assert_only_sequence_poisoned(decode(block_table=bad_table), 1)
    longer = torch.tensor([100, 200, 130], dtype=torch.int32, device=device)  # beyond the block table's 3 pages
    longer_metadata, longer_splits = dsv3.get_mla_metadata(longer, 16, 1, num_parts=2)
    assert_only_sequence_poisoned(
        decode(cache_seqlens=longer, tile_scheduler_metadata=longer_metadata, num_splits=longer_splits), 1, False
    )
    shorter = torch.tensor([100, 10, 130], dtype=torch.int32, device=device)  # schedule computed for 70
    out, lse = decode(cache_seqlens=shorter)
    assert torch.isnan(lse[1]).all() and torch.isnan(out[1]).all()


def test_decode_rejects_foreign_and_misaligned_tensors(device):
    _, block_table, _, q, _, decode = _bad_input_case(device, [100, 70])
    with pytest.raises(ValueError, match="block_table: expected a tensor on cuda"):
        decode(block_table=block_table.cpu())
    with pytest.raises(ValueError, match="q: expected a 16-byte aligned data pointer"):
        unaligned = torch.empty(q.numel() + 8, dtype=torch.bfloat16, device=device)[1:][: q.numel()]
        decode(q=unaligned.view(q.shape))


def test_append_rejects_bad_slots(device):
    # Contents are not checked on the GPU: a slot outside the cache is skipped, the other tokens are written.
    cache = torch.zeros(2, 64, 1, ref.HEAD_DIM, dtype=torch.bfloat16, device=device)
    latent, rope = torch.randn(3, 512, device=device), torch.randn(3, 64, device=device)
    dsv3.append_kv_cache(cache, torch.tensor([0, 128, -5], device=device), latent, rope)
    expected = torch.zeros(2, 64, 1, ref.HEAD_DIM, dtype=torch.bfloat16)
    ref.append_kv_cache(expected, torch.tensor([0, -1, -1]), latent.cpu(), rope.cpu())
    assert_bitwise_equal(cache.cpu(), expected, "kv_cache")
    with pytest.raises(TypeError, match="slot_mapping: expected dtype int64"):
        dsv3.append_kv_cache(cache, torch.tensor([0, 1, 2], dtype=torch.int32, device=device), latent, rope)
    with pytest.raises(ValueError, match=r"latent: expected shape \[3, 512\]"):
        dsv3.append_kv_cache(cache, torch.tensor([0, 1, 2], device=device), latent[:, :256].contiguous(), rope)
    with pytest.raises(ValueError, match="slot_mapping: expected a tensor on cuda"):
        dsv3.append_kv_cache(cache, torch.tensor([0, 1, 2]), latent, rope)


# ---- the schedule -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_parts", [1, 2, 7, 66, 132, 1000])
@pytest.mark.parametrize(
    "seqlens",
    [[], [0], SEQLENS, [4096] * 128, [0, 0, 0], [5000, 1, 0, 64, 64], [129] * 100, "random", "large_batch"],
)
def test_device_schedule_equals_cpu_schedule(num_parts, seqlens):
    if seqlens == "random":
        seqlens = torch.randint(0, 9000, (333,)).tolist()
    elif seqlens == "large_batch":  # more sequences than the kernel stages in shared memory
        seqlens = torch.randint(0, 300, (9000,)).tolist()
    lengths = torch.tensor(seqlens, dtype=torch.int32)
    cpu_metadata, cpu_splits = dsv3.get_mla_metadata(lengths, 16, 1, num_parts)
    metadata, splits = dsv3.get_mla_metadata(lengths.to(CUDA), 16, 1, num_parts)
    assert metadata.device.type == "cuda" and splits.device.type == "cuda"
    assert torch.equal(metadata.cpu(), cpu_metadata) and torch.equal(splits.cpu(), cpu_splits)


def test_default_num_parts_is_one_wave():
    sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    lengths = torch.full((8,), 1000, dtype=torch.int32, device=CUDA)
    assert dsv3.get_mla_metadata(lengths, 16, 1)[0].shape[0] == sms
    assert dsv3.get_mla_metadata(lengths, 256, 1)[0].shape[0] == sms // 4  # 4 query tiles of 64 rows


# ---- decode -------------------------------------------------------------------------------------------------------

LONG_SEQLENS = [0, 1, 63, 64, 65, 1000, 1025, 3000, 127, 5]


@pytest.mark.parametrize("heads", [16, 32, 64, 128])
@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_parts", [1, 13, None])
def test_decode_matches_reference_and_cpu(heads, s_q, causal, num_parts):
    cache, block_table, seqlens = _paged_cache(LONG_SEQLENS, num_blocks_extra=9, device=CUDA)
    q = torch.randn(len(LONG_SEQLENS), s_q, heads, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    out, lse = _assert_matches_reference(q, cache, block_table, seqlens, causal, num_parts=num_parts)
    cpu_out, cpu_lse = _decode(q.cpu(), cache.cpu(), block_table.cpu(), seqlens.cpu(), causal, num_parts=num_parts)
    assert_close(out.cpu().float(), cpu_out.float(), atol=8e-3, rtol=8e-3, max_diff=1e-5, name="out vs CPU")
    assert_close(lse.cpu(), cpu_lse, atol=1e-5, rtol=1e-5, name="lse vs CPU")
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("inf"))
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()


@pytest.mark.parametrize("heads", [1, 8, 24, 40, 96])
@pytest.mark.parametrize("s_q", [1, 2])
def test_decode_query_rows_that_do_not_fill_a_tile(heads, s_q):
    # s_q * heads of 1..192: the last query tile is partly padding (and reads the next sequence's rows)
    cache, block_table, seqlens = _paged_cache([300, 64, 1, 700], device=CUDA)
    q = torch.randn(4, s_q, heads, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    _assert_matches_reference(q, cache, block_table, seqlens, True, num_parts=3)


@pytest.mark.parametrize("head_dim_v", [512, 256, 100])
def test_decode_narrower_values(head_dim_v):
    cache, block_table, seqlens = _paged_cache([300, 1000], device=CUDA)
    q = torch.randn(2, 1, 16, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    metadata, num_splits = dsv3.get_mla_metadata(seqlens, 16, 1, num_parts=5)
    out, lse = dsv3.mla_decode_with_kvcache(q, cache, block_table, seqlens, head_dim_v, metadata, num_splits)
    r_out, r_lse = ref.mla_decode_with_kvcache(
        q.cpu(), cache.cpu(), block_table.cpu(), seqlens.cpu(), head_dim_v=head_dim_v
    )
    assert out.shape == (2, 1, 16, head_dim_v)
    assert_close(out.cpu().float(), r_out.float(), atol=8e-3, rtol=8e-3, max_diff=1e-5, name="out")
    assert_close(lse.cpu(), r_lse, atol=1e-5, rtol=1e-5, name="lse")


def test_decode_long_sequence_many_splits():
    # one sequence cut over every SM, merged by the combine kernel; and a batch of DeepSeek-V3 decode shape
    cache, block_table, seqlens = _paged_cache([20000], device=CUDA)
    q = torch.randn(1, 2, 128, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    _assert_matches_reference(q, cache, block_table, seqlens, True)
    cache, block_table, seqlens = _paged_cache([4096] * 16, device=CUDA)
    q = torch.randn(16, 1, 16, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    _assert_matches_reference(q, cache, block_table, seqlens, False)


@pytest.mark.parametrize("heads", [16, 64, 128])
@pytest.mark.parametrize("s_q", [1, 2])
def test_fp8_cache_matches_reference_and_cpu(heads, s_q):
    # the group scales never pass through bf16 on the score side, so lse keeps the bf16-cache accuracy
    cache, block_table, seqlens = _paged_cache(LONG_SEQLENS, fp8=True, device=CUDA)
    q = torch.randn(len(LONG_SEQLENS), s_q, heads, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    out, lse = _assert_matches_reference(q, cache, block_table, seqlens, True, num_parts=11)
    cpu_out, cpu_lse = _decode(q.cpu(), cache.cpu(), block_table.cpu(), seqlens.cpu(), True, num_parts=11)
    assert_close(out.cpu().float(), cpu_out.float(), atol=8e-3, rtol=8e-3, max_diff=1e-5, name="out vs CPU")
    assert_close(lse.cpu(), cpu_lse, atol=1e-5, rtol=1e-5, name="lse vs CPU")


@pytest.mark.parametrize(("heads", "s_q"), [(16, 1), (16, 2), (64, 2)])  # query tiles of 16, 32 and 64 rows
def test_nan_everywhere_outside_the_sequences_never_reaches_the_output(heads, s_q):
    # every row past each sequence's length is NaN, including the tails of partial pages and whole unused pages
    for fp8 in (False, True):
        lengths = [1, 2, 33, 63, 65, 127]
        cache, block_table, seqlens = _paged_cache(lengths, num_blocks_extra=20, fp8=fp8, device=CUDA)
        for seq, length in enumerate(lengths):  # unused table entries pointing at real pages change nothing either
            if length <= 64:
                block_table[seq, 1] = block_table[5, 0]
        q = torch.randn(6, s_q, heads, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
        for causal in (False, True):
            out, lse = _decode(q, cache, block_table, seqlens, causal, num_parts=4)
            assert torch.isfinite(out).all() and not torch.isnan(lse).any()


def test_results_do_not_depend_on_page_placement():
    cache, block_table, seqlens = _paged_cache([500, 1300], device=CUDA)
    q = torch.randn(2, 1, 32, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    out, lse = _decode(q, cache, block_table, seqlens, False, num_parts=4)
    # the same rows on contiguous pages
    pages = block_table.long().clamp(min=0)
    flat = torch.full((2 * 21, 64, 1, ref.HEAD_DIM), float("nan"), dtype=torch.bfloat16, device=CUDA)
    contiguous = torch.arange(2 * 21, dtype=torch.int32, device=CUDA).reshape(2, 21)
    for seq, length in enumerate([500, 1300]):
        used = -(-length // 64)
        flat[contiguous[seq, :used].long()] = cache[pages[seq, :used]]
    out2, lse2 = _decode(q, flat, contiguous, seqlens, False, num_parts=4)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


# ---- the opt-in kernel for 64-row query tiles with the query rows as the MMAs' M side (DSV3_MLA_KERNEL=rows) ----


@pytest.fixture
def rows_kernel(monkeypatch):
    skip_if_smoke_failed("mla_rows")
    monkeypatch.setenv("DSV3_MLA_KERNEL", "rows")


@pytest.mark.parametrize("heads", [64, 96, 128])
@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_parts", [1, 13, None])
def test_rows_kernel_matches_reference_and_default_kernel(rows_kernel, monkeypatch, heads, s_q, causal, num_parts):
    # mixed lengths (empty, page-sized, partial pages, thousands), splits across and within sequences, and 96 heads:
    # a partial second tile of query rows
    cache, block_table, seqlens = _paged_cache(LONG_SEQLENS, num_blocks_extra=9, device=CUDA)
    q = torch.randn(len(LONG_SEQLENS), s_q, heads, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    out, lse = _assert_matches_reference(q, cache, block_table, seqlens, causal, num_parts=num_parts)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("inf"))
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    monkeypatch.delenv("DSV3_MLA_KERNEL")
    default_out, default_lse = _decode(q, cache, block_table, seqlens, causal, num_parts=num_parts)
    assert_close(out.float(), default_out.float(), atol=8e-3, rtol=8e-3, max_diff=1e-5, name="out vs default kernel")
    assert_close(lse, default_lse, atol=1e-5, rtol=1e-5, name="lse vs default kernel")


@pytest.mark.parametrize("head_dim_v", [512, 256, 100, 7])
def test_rows_kernel_narrower_values(rows_kernel, head_dim_v):
    cache, block_table, seqlens = _paged_cache([700, 65], device=CUDA)
    q = torch.randn(2, 1, 128, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    metadata, num_splits = dsv3.get_mla_metadata(seqlens, 128, 1, num_parts=3)
    out, lse = dsv3.mla_decode_with_kvcache(q, cache, block_table, seqlens, head_dim_v, metadata, num_splits)
    r_out, r_lse = ref.mla_decode_with_kvcache(q.cpu(), cache.cpu(), block_table.cpu(), seqlens.cpu())
    assert out.shape == (2, 1, 128, head_dim_v)
    assert_close(out.cpu().float(), r_out[..., :head_dim_v].float(), atol=8e-3, rtol=8e-3, max_diff=1e-5, name="out")
    assert_close(lse.cpu(), r_lse, atol=1e-5, rtol=1e-5, name="lse")


def test_rows_kernel_never_lets_nan_outside_the_sequences_through(rows_kernel):
    lengths = [1, 2, 33, 63, 65, 127]
    cache, block_table, seqlens = _paged_cache(lengths, num_blocks_extra=20, device=CUDA)
    for seq, length in enumerate(lengths):
        if length <= 64:
            block_table[seq, 1] = block_table[5, 0]
    q = torch.randn(6, 2, 64, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    for causal in (False, True):
        out, lse = _decode(q, cache, block_table, seqlens, causal, num_parts=4)
        assert torch.isfinite(out).all() and not torch.isnan(lse).any()


def test_rows_kernel_poisons_only_the_sequence_with_a_bad_page(rows_kernel):
    cache, block_table, seqlens = _paged_cache([100, 70, 130], device=CUDA)
    q = torch.randn(3, 1, 128, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    good_out, good_lse = _decode(q, cache, block_table, seqlens, False, num_parts=2)
    bad_table = block_table.clone()
    bad_table[1, 1] = cache.shape[0]
    out, lse = _decode(q, cache, bad_table, seqlens, False, num_parts=2)
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1]).all()
    assert torch.equal(out[[0, 2]], good_out[[0, 2]]) and torch.equal(lse[[0, 2]], good_lse[[0, 2]])


def test_rows_kernel_is_not_used_for_the_fp8_cache(rows_kernel, monkeypatch):
    # the FP8 cache keeps the default kernel at every width: the same bits with or without the variable
    cache, block_table, seqlens = _paged_cache([300, 1000], fp8=True, device=CUDA)
    q = torch.randn(2, 1, 128, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    out, lse = _decode(q, cache, block_table, seqlens, False, num_parts=5)
    monkeypatch.delenv("DSV3_MLA_KERNEL")
    default_out, default_lse = _decode(q, cache, block_table, seqlens, False, num_parts=5)
    assert torch.equal(out, default_out) and torch.equal(lse, default_lse)


def test_an_unknown_kernel_request_is_an_error_naming_the_variable(monkeypatch):
    cache, block_table, seqlens = _paged_cache([70], device=CUDA)
    q = torch.randn(1, 1, 16, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    monkeypatch.setenv("DSV3_MLA_KERNEL", "row")
    with pytest.raises(ValueError, match="DSV3_MLA_KERNEL: expected rows"):
        _decode(q, cache, block_table, seqlens, False)


def test_decode_and_schedule_capture_in_a_cuda_graph():
    cache, block_table, seqlens = _paged_cache([700, 64, 1500], device=CUDA)
    q = torch.randn(3, 2, 16, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)

    def step():
        metadata, num_splits = dsv3.get_mla_metadata(seqlens, 32, 1)
        return dsv3.mla_decode_with_kvcache(q, cache, block_table, seqlens, 512, metadata, num_splits, causal=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out, lse = step()
    torch.cuda.current_stream().wait_stream(stream)
    # new inputs in place: other queries and one sequence shorter (the schedule is recomputed inside the graph)
    q.copy_(torch.randn_like(q))
    seqlens.copy_(torch.tensor([700, 64, 900], dtype=torch.int32, device=CUDA))
    graph.replay()
    torch.cuda.synchronize()
    expected_out, expected_lse = step()
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    r_out, r_lse = ref.mla_decode_with_kvcache(q.cpu(), cache.cpu(), block_table.cpu(), seqlens.cpu(), causal=True)
    assert_close(out.cpu().float(), r_out.float(), atol=8e-3, rtol=8e-3, max_diff=1e-5, name="out")
    assert_close(lse.cpu(), r_lse, atol=1e-5, rtol=1e-5, name="lse")


def test_decode_runs_on_the_current_stream():
    cache, block_table, seqlens = _paged_cache([2000] * 8, device=CUDA)
    q = torch.randn(8, 1, 128, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    expected = _decode(q, cache, block_table, seqlens, False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(10_000_000)  # if the kernels ran elsewhere, they would read q before it is written
        q2 = q.clone()
        out, lse = _decode(q2, cache, block_table, seqlens, False)
    torch.cuda.synchronize()
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


# ---- appending ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_append_equals_cpu_kernel_bitwise_with_extreme_values(fp8, dtype, ue8m0):
    num_blocks, tokens = 40, 2000
    width = ref.FP8_ROW_BYTES if fp8 else ref.HEAD_DIM
    cache = torch.randint(0, 256, (num_blocks, 64, 1, width * (1 if fp8 else 2)), dtype=torch.uint8)
    cache = cache if fp8 else cache.view(torch.bfloat16)
    slots = torch.randperm(num_blocks * 64)[:tokens]
    slots[::7] = -1
    latent = (torch.randn(tokens, 512) * torch.logspace(-6, 4, 512)).to(dtype)
    latent[3] = 0.0
    latent[5, 17] = float("nan")
    latent[6, 200] = float("inf")
    latent[7] = 1e-30
    rope = torch.randn(tokens, 64).to(dtype)
    rope[8, 3] = float("nan")
    expected = cache.clone()
    dsv3.append_kv_cache(expected, slots, latent, rope, ue8m0=ue8m0)
    actual = cache.to(CUDA)
    dsv3.append_kv_cache(actual, slots.to(CUDA), latent.to(CUDA), rope.to(CUDA), ue8m0=ue8m0)
    actual = actual.cpu()
    if not fp8:
        assert_bitwise_equal(actual, expected, "kv_cache")
        return
    # field by field, so that only NaN payloads (which x86 and the GPU propagate differently) may differ
    a, e = actual.view(-1, ref.FP8_ROW_BYTES), expected.view(-1, ref.FP8_ROW_BYTES)
    fields = {
        "latent": (0, 512, ref.FP8_DTYPE),
        "scales": (512, 528, torch.float32),
        "rope": (528, 656, torch.bfloat16),
    }
    for name, (lo, hi, dtype) in fields.items():
        assert_bitwise_equal(a[:, lo:hi].contiguous().view(dtype), e[:, lo:hi].contiguous().view(dtype), name)


def test_append_then_decode_on_device_matches_cpu():
    cache = torch.zeros(8, 64, 1, ref.FP8_ROW_BYTES, dtype=torch.uint8, device=CUDA)
    latent, rope = torch.randn(300, 512, device=CUDA), torch.randn(300, 64, device=CUDA)
    block_table = torch.tensor([[5, 1, 7, 0, 2]], dtype=torch.int32, device=CUDA)
    positions = torch.arange(300, device=CUDA)
    slots = (block_table[0, positions // 64].long() * 64 + positions % 64).to(CUDA)
    dsv3.append_kv_cache(cache, slots, latent, rope)
    q = torch.randn(1, 1, 16, ref.HEAD_DIM).to(torch.bfloat16).to(CUDA)
    seqlens = torch.tensor([300], dtype=torch.int32, device=CUDA)
    out, _ = _decode(q, cache, block_table, seqlens, False)
    cpu_out, _ = _decode(q.cpu(), cache.cpu(), block_table.cpu(), seqlens.cpu(), False)
    assert calc_diff(out.cpu().float(), cpu_out.float()) < 1e-4
