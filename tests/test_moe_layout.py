"""MoE token layouts and (un)permutation vs dsv3.reference.moe, compared bit for bit; on the CPU here and on the GPU
through tests/cuda/test_moe_cuda.py (same tests, `device` overridden).

On a GPU a contiguous layout has more rows than M_sum (an upper bound, allocated without a host synchronization):
the rows past num_rows must be padding (-1 indices, zero rows), and bad input is reported through layout.errors /
layout.check() rather than raised by the layout call itself."""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.ops.moe import contiguous_rows_bound
from dsv3.reference import moe as ref
from dsv3.reference import quant as ref_quant
from dsv3.testing import assert_bitwise_equal

E = 256
HIDDEN = 7168


def _routed(tokens: int, seed: int = 0) -> torch.Tensor:
    """DeepSeek-V3 routing (256 experts, top-8 of the best 4 of 8 groups) of random bf16 logits."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, E, generator=gen).to(torch.bfloat16)
    return ref.grouped_topk(logits, torch.randn(E, generator=gen) * 0.1, 8, 8, 4, 2.5)[1]


def _skewed(tokens: int, k: int = 8, seed: int = 0) -> torch.Tensor:
    """Most slots to experts 3 and 200, a few spread, ~10% dropped (-1): the low experts mostly stay empty."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.where(torch.rand(tokens, k, generator=gen) < 0.5, 3, 200)
    spread = torch.rand(tokens, k, generator=gen) < 0.1
    idx[spread] = torch.randint(128, E, (int(spread.sum()),), generator=gen)
    idx[torch.rand(tokens, k, generator=gen) < 0.1] = -1
    return idx.to(torch.int32)


def _check_contiguous(layout, topk_idx: torch.Tensor, alignment: int = 128) -> ref.ContiguousLayout:
    expected = ref.moe_contiguous_layout(topk_idx.cpu(), E, alignment)
    rows = expected.num_rows
    layout.check()
    assert layout.num_rows == rows
    t, k = topk_idx.shape
    allocated = rows if topk_idx.device.type == "cpu" else contiguous_rows_bound(t, k, E, alignment)
    for name in ("m_indices", "src_token", "src_slot"):
        got = getattr(layout, name).cpu()
        assert got.shape == (allocated,), f"{name}: {tuple(got.shape)} rows, expected {allocated}"
        assert_bitwise_equal(got[:rows], getattr(expected, name), name)
        assert bool((got[rows:] == -1).all()), f"{name}: rows past num_rows must be -1"
    for name in ("row_of", "tokens_per_expert", "expert_offsets"):
        assert_bitwise_equal(getattr(layout, name).cpu(), getattr(expected, name), name)
    return expected


def _check_masked(layout, topk_idx: torch.Tensor, max_m: int) -> ref.MaskedLayout:
    expected = ref.moe_masked_layout(topk_idx.cpu(), E, max_m)
    layout.check()
    assert layout.max_m == max_m
    for name in ("src_token", "src_slot", "masked_m", "row_of"):
        assert_bitwise_equal(getattr(layout, name).cpu(), getattr(expected, name), name)
    assert_bitwise_equal(layout.tokens_per_expert.cpu(), expected.masked_m, "tokens_per_expert")
    return expected


ROUTINGS = {
    "1 token": lambda: _routed(1),
    "7 tokens": lambda: _routed(7, seed=7),
    "300 tokens": lambda: _routed(300, seed=300),
    "2048 tokens": lambda: _routed(2048, seed=2048),
    "skewed": lambda: _skewed(1500),
    "-1 slots": lambda: torch.where(torch.rand(40, 8) < 0.3, -1, _routed(40, seed=1)).to(torch.int32),
    "all -1": lambda: torch.full((5, 8), -1, dtype=torch.int32),
    "no tokens": lambda: torch.empty(0, 8, dtype=torch.int32),
}


@pytest.mark.parametrize("routing", ROUTINGS)
def test_contiguous_layout_matches_reference(device, routing):
    topk_idx = ROUTINGS[routing]().to(device)
    _check_contiguous(dsv3.moe_contiguous_layout(topk_idx, E), topk_idx)


@pytest.mark.parametrize("alignment", [1, 4, 64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_contiguous_layout_alignments_and_index_types(device, alignment, index_dtype):
    topk_idx = _skewed(300, k=6, seed=alignment).to(index_dtype).to(device)
    _check_contiguous(dsv3.moe_contiguous_layout(topk_idx, E, alignment=alignment), topk_idx, alignment)


def test_contiguous_layout_hand_made_example(device):
    topk_idx = torch.tensor([[1, 3], [1, -1], [3, 1]], dtype=torch.int32, device=device)
    layout = dsv3.moe_contiguous_layout(topk_idx, num_experts=4, alignment=4)
    rows = layout.num_rows
    assert rows == 8
    assert layout.m_indices.cpu()[:rows].tolist() == [1, 1, 1, -1, 3, 3, -1, -1]
    assert layout.src_token.cpu()[:rows].tolist() == [0, 1, 2, -1, 0, 2, -1, -1]
    assert layout.src_slot.cpu()[:rows].tolist() == [0, 0, 1, -1, 1, 0, -1, -1]
    assert layout.row_of.cpu().tolist() == [[0, 4], [1, -1], [5, 2]]
    assert layout.tokens_per_expert.cpu().tolist() == [0, 3, 0, 2]
    assert layout.expert_offsets.cpu().tolist() == [0, 0, 4, 4, 8]


@pytest.mark.parametrize("routing", ROUTINGS)
def test_masked_layout_matches_reference(device, routing):
    topk_idx = ROUTINGS[routing]().to(device)
    counts = torch.bincount(topk_idx[topk_idx >= 0].long().cpu(), minlength=E)
    max_m = max(int(counts.max()), 1)  # exactly enough for the busiest expert
    _check_masked(dsv3.moe_masked_layout(topk_idx, E, max_m), topk_idx, max_m)
    _check_masked(dsv3.moe_masked_layout(topk_idx.long(), E, max_m + 3), topk_idx, max_m + 3)


def test_masked_layout_overflow(device):
    topk_idx = _skewed(64).to(device)
    counts = torch.bincount(topk_idx[topk_idx >= 0].long().cpu(), minlength=E)
    max_m = 16
    assert int(counts.max()) > max_m
    if device.type == "cpu":
        with pytest.raises(ValueError, match="expert 3 receives .* rows, more than max_m=16"):
            dsv3.moe_masked_layout(topk_idx, E, max_m)
        return
    # On a GPU: every expert keeps its first max_m rows, the rest are dropped and counted, nothing out of bounds.
    layout = dsv3.moe_masked_layout(topk_idx, E, max_m)
    full = ref.moe_masked_layout(topk_idx.cpu(), E, int(counts.max()))
    assert_bitwise_equal(layout.src_token.cpu(), full.src_token[:, :max_m], "src_token")
    assert_bitwise_equal(layout.masked_m.cpu(), counts.clamp(max=max_m).to(torch.int32), "masked_m")
    assert_bitwise_equal(layout.tokens_per_expert.cpu(), counts.to(torch.int32), "tokens_per_expert")
    expert, rank = full.row_of // full.max_m, full.row_of % full.max_m
    expected_row_of = torch.where((full.row_of >= 0) & (rank < max_m), expert * max_m + rank, -1)
    assert_bitwise_equal(layout.row_of.cpu(), expected_row_of, "row_of")
    assert layout.errors.cpu().tolist() == [0, int((counts - max_m).clamp(min=0).sum())]
    with pytest.raises(ValueError, match="max_m=16"):
        layout.check()


@pytest.mark.parametrize("bad", [256, -2, 1 << 20])
def test_out_of_range_experts(device, bad):
    topk_idx = _routed(20).to(device)
    topk_idx[4, 3] = bad
    if device.type == "cpu":
        for make in (lambda: dsv3.moe_contiguous_layout(topk_idx, E), lambda: dsv3.moe_masked_layout(topk_idx, E, 64)):
            with pytest.raises(ValueError, match=rf"topk_idx: values must lie in \[-1, 256\).*got {bad} at \[4, 3\]"):
                make()
        return
    # On a GPU the slot takes no row, as if it were -1, and is reported.
    as_dropped = topk_idx.clone()
    as_dropped[4, 3] = -1
    for layout in (dsv3.moe_contiguous_layout(topk_idx, E), dsv3.moe_masked_layout(topk_idx, E, 64)):
        assert layout.errors.cpu().tolist() == [1, 0]
        with pytest.raises(ValueError, match="topk_idx: 1 values outside"):
            layout.check()
    contiguous = dsv3.moe_contiguous_layout(topk_idx, E)
    contiguous.errors.zero_()  # reported above; the rows must be those of the slot dropped
    _check_contiguous(contiguous, as_dropped)


# ---- permutation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["1 token", "300 tokens", "skewed", "-1 slots", "all -1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_permute_unpermute_contiguous_bitwise(device, routing, dtype):
    topk_idx = ROUTINGS[routing]()
    tokens = topk_idx.shape[0]
    hidden = 512
    layout = dsv3.moe_contiguous_layout(topk_idx.to(device), E)
    expected_layout = ref.moe_contiguous_layout(topk_idx, E, 128)
    rows = expected_layout.num_rows
    x = torch.randn(tokens, hidden).to(dtype)

    permuted = dsv3.permute_tokens(x.to(device), layout).cpu()
    expected = ref.permute_tokens(x, expected_layout)
    assert_bitwise_equal(permuted[:rows], expected, "permuted")
    assert bool((permuted[rows:] == 0).all())

    for ue8m0 in (False, True):
        q, scales = dsv3.permute_tokens(x.to(device), layout, quantize=True, ue8m0=ue8m0)
        expected_q, expected_scales = ref_quant.per_token_group_quant_fp8(permuted, 128, ue8m0)
        assert_bitwise_equal(q.cpu(), expected_q, "q")
        assert_bitwise_equal(scales.cpu(), expected_scales, "scales")

    weights = torch.rand(tokens, 8)
    weights[topk_idx < 0] = float("nan")  # never read
    y = torch.randn(layout.m_indices.shape[0], hidden).to(dtype)
    y[layout.m_indices.cpu() < 0] = float("nan")  # padding rows are never read
    out = dsv3.unpermute_tokens(y.to(device), layout, weights.to(device))
    assert_bitwise_equal(out.cpu(), ref.unpermute_tokens(y[:rows], expected_layout, weights), "unpermuted")


def test_permute_unpermute_real_hidden_size(device):
    topk_idx = _routed(7, seed=5)
    layout = dsv3.moe_contiguous_layout(topk_idx.to(device), E)
    expected_layout = ref.moe_contiguous_layout(topk_idx, E)
    rows = expected_layout.num_rows
    x = (torch.randn(7, HIDDEN) * torch.logspace(-3, 3, HIDDEN)).to(torch.bfloat16)
    x[2, 100] = float("nan")
    x[3, 5000] = float("inf")
    q, scales = dsv3.permute_tokens(x.to(device), layout, quantize=True)
    expected_q, expected_scales = ref_quant.per_token_group_quant_fp8(ref.permute_tokens(x, expected_layout))
    assert_bitwise_equal(q.cpu()[:rows], expected_q, "q")
    assert_bitwise_equal(scales.cpu()[:rows], expected_scales, "scales")
    y = torch.randn(layout.m_indices.shape[0], HIDDEN).to(torch.bfloat16)
    weights = torch.rand(7, 8)
    out = dsv3.unpermute_tokens(y.to(device), layout, weights.to(device))
    assert_bitwise_equal(out.cpu(), ref.unpermute_tokens(y[:rows], expected_layout, weights), "unpermuted")


@pytest.mark.parametrize(
    "dtype,hidden", [(torch.float16, 7), (torch.bfloat16, 6), (torch.float32, 3), (torch.bfloat16, 4)]
)
def test_permute_unpermute_odd_row_sizes(device, dtype, hidden):
    topk_idx = _skewed(50, k=3)
    layout = dsv3.moe_contiguous_layout(topk_idx.to(device), E, alignment=4)
    expected_layout = ref.moe_contiguous_layout(topk_idx, E, 4)
    rows = expected_layout.num_rows
    x = torch.randn(50, hidden).to(dtype)
    assert_bitwise_equal(dsv3.permute_tokens(x.to(device), layout).cpu()[:rows], ref.permute_tokens(x, expected_layout))
    y = torch.randn(layout.m_indices.shape[0], hidden).to(dtype)
    weights = torch.rand(50, 3)
    out = dsv3.unpermute_tokens(y.to(device), layout, weights.to(device))
    assert_bitwise_equal(out.cpu(), ref.unpermute_tokens(y[:rows], expected_layout, weights), "unpermuted")


def test_unpermute_sums_in_slot_order_from_positive_zero(device):
    # Slot order matters in fp32: 1 + 2^-24 + 2^-24 != 2^-24 + 2^-24 + 1. A lone -0.0 comes back as +0.0.
    topk_idx = torch.tensor([[0, 1, 2], [2, 1, 0], [0, -1, -1], [-1, -1, -1]], dtype=torch.int32)
    layout = dsv3.moe_contiguous_layout(topk_idx.to(device), 3, alignment=1)
    expected_layout = ref.moe_contiguous_layout(topk_idx, 3, 1)
    y = torch.zeros(layout.m_indices.shape[0], 2)
    for row, (token, expert) in enumerate(
        zip(expected_layout.src_token.tolist(), expected_layout.m_indices.tolist(), strict=True)
    ):
        y[row] = torch.tensor([-0.0, -0.0]) if token == 2 else torch.tensor([1.0 if expert == 0 else 2.0**-24, -0.0])
    weights = torch.ones(4, 3)
    out = dsv3.unpermute_tokens(y.to(device), layout, weights.to(device)).cpu()
    assert_bitwise_equal(out, ref.unpermute_tokens(y[: expected_layout.num_rows], expected_layout, weights))
    assert out[0, 0] == 1.0 and out[1, 0] == 1.0 + 2.0**-23
    assert torch.equal(out[2:].view(torch.int32), torch.zeros(2, 2, dtype=torch.int32))  # +0.0, not -0.0


@pytest.mark.parametrize("dtype,hidden", [(torch.bfloat16, 7168), (torch.float32, 1000)])
def test_unpermute_with_more_slots_than_loads_in_flight(device, dtype, hidden):
    """11 slots a token (a GPU thread loads 8 at a time), some empty, over rows wider than one block of threads."""
    topk_idx = _skewed(30, k=11, seed=2)
    layout = dsv3.moe_contiguous_layout(topk_idx.to(device), E, alignment=8)
    expected_layout = ref.moe_contiguous_layout(topk_idx, E, 8)
    rows = expected_layout.num_rows
    y = torch.randn(layout.m_indices.shape[0], hidden).to(dtype)
    weights = torch.rand(30, 11)
    out = dsv3.unpermute_tokens(y.to(device), layout, weights.to(device)).cpu()
    assert_bitwise_equal(out, ref.unpermute_tokens(y[:rows], expected_layout, weights), "unpermuted")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_permute_unpermute_masked_bitwise(device, dtype):
    topk_idx = _skewed(40, seed=1)
    max_m = int(torch.bincount(topk_idx[topk_idx >= 0].long()).max())
    hidden = 128
    layout = dsv3.moe_masked_layout(topk_idx.to(device), E, max_m)
    expected_layout = ref.moe_masked_layout(topk_idx, E, max_m)
    x = torch.randn(40, hidden).to(dtype)
    permuted = dsv3.permute_tokens_masked(x.to(device), layout).cpu()
    assert_bitwise_equal(permuted, ref.permute_tokens_masked(x, expected_layout), "permuted")
    q, scales = dsv3.permute_tokens_masked(x.to(device), layout, quantize=True)
    assert q.shape == (E, max_m, hidden) and scales.shape == (E, max_m, 1)
    expected_q, expected_scales = ref_quant.per_token_group_quant_fp8(permuted)
    assert_bitwise_equal(q.cpu(), expected_q, "q")
    assert_bitwise_equal(scales.cpu(), expected_scales, "scales")
    y = torch.randn(E, max_m, hidden).to(dtype)
    weights = torch.rand(40, 8)
    out = dsv3.unpermute_tokens_masked(y.to(device), layout, weights.to(device))
    assert_bitwise_equal(out.cpu(), ref.unpermute_tokens_masked(y, expected_layout, weights), "unpermuted")


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_layouts_reject_bad_input(device):
    topk_idx = _routed(4).to(device)
    with pytest.raises(TypeError, match="topk_idx: expected dtype int32 or int64"):
        dsv3.moe_contiguous_layout(topk_idx.float(), E)
    with pytest.raises(ValueError, match="topk_idx: expected 2 dimensions"):
        dsv3.moe_masked_layout(topk_idx[0], E, 8)
    with pytest.raises(ValueError, match="num_experts: expected a positive int"):
        dsv3.moe_contiguous_layout(topk_idx, 0)
    with pytest.raises(ValueError, match="num_experts: expected at most 1024"):
        dsv3.moe_contiguous_layout(topk_idx, 4096)
    with pytest.raises(ValueError, match="alignment: expected a positive int"):
        dsv3.moe_contiguous_layout(topk_idx, E, alignment=0)
    with pytest.raises(ValueError, match="max_m: expected an int >= 0"):
        dsv3.moe_masked_layout(topk_idx, E, -1)
    with pytest.raises(ValueError, match="topk_idx: expected a contiguous tensor"):
        dsv3.moe_contiguous_layout(topk_idx.t(), E)


def test_permutations_reject_bad_input(device):
    topk_idx = _routed(4).to(device)
    layout = dsv3.moe_contiguous_layout(topk_idx, E)
    masked = dsv3.moe_masked_layout(topk_idx, E, 4)
    x = torch.randn(4, 256, device=device)
    with pytest.raises(ValueError, match="x: 5 tokens, the layout has 4"):
        dsv3.permute_tokens(torch.randn(5, 256, device=device), layout)
    with pytest.raises(TypeError, match="x: expected dtype"):
        dsv3.permute_tokens(x.double(), layout)
    with pytest.raises(ValueError, match="x: hidden size 200 is not a multiple of 128"):
        dsv3.permute_tokens(torch.randn(4, 200, device=device), layout, quantize=True)
    with pytest.raises(TypeError, match="layout.src_token: expected a torch.Tensor"):
        dsv3.permute_tokens(x, object())
    rows = layout.m_indices.shape[0]
    with pytest.raises(ValueError, match=rf"y: expected \[{rows}, H\]"):
        dsv3.unpermute_tokens(torch.randn(rows + 1, 256, device=device), layout, torch.rand(4, 8, device=device))
    with pytest.raises(ValueError, match=r"topk_weights: expected shape \[4, 8\]"):
        dsv3.unpermute_tokens(torch.randn(rows, 256, device=device), layout, torch.rand(4, 7, device=device))
    with pytest.raises(TypeError, match="topk_weights: expected dtype float32"):
        dsv3.unpermute_tokens(torch.randn(rows, 256, device=device), layout, torch.rand(4, 8, device=device).half())
    with pytest.raises(ValueError, match=r"y: expected \[256, 4, H\]"):
        dsv3.unpermute_tokens_masked(torch.randn(256, 5, 8, device=device), masked, torch.rand(4, 8, device=device))


def test_corrupted_layouts_stay_in_bounds(device):
    """Layout indices edited by hand: the CPU raises, a GPU treats out-of-range entries as absent."""
    topk_idx = _routed(4)
    layout = dsv3.moe_contiguous_layout(topk_idx.to(device), E)
    x = torch.randn(4, 128, device=device)
    layout.src_token[0] = 4
    layout.src_token[1] = -7
    layout.row_of[0, 0] = layout.m_indices.shape[0]
    y = torch.randn(layout.m_indices.shape[0], 128, device=device)
    weights = torch.rand(4, 8, device=device)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="src_token: values must lie in"):
            dsv3.permute_tokens(x, layout)
        with pytest.raises(ValueError, match="row_of: values must lie in"):
            dsv3.unpermute_tokens(y, layout, weights)
        return
    permuted = dsv3.permute_tokens(x, layout)
    assert bool((permuted[:2] == 0).all())
    q, _ = dsv3.permute_tokens(x, layout, quantize=True)
    assert bool((q[:2].view(torch.uint8) == 0).all())
    out = dsv3.unpermute_tokens(y, layout, weights)
    row_of = layout.row_of.clone()
    row_of[0, 0] = -1
    layout.row_of = row_of
    assert torch.equal(out, dsv3.unpermute_tokens(y, layout, weights))


def test_kernel_entry_points_revalidate(device):
    from dsv3.ops.extension import run_kernel

    x = torch.randn(2, 128, device=device)
    src = torch.zeros(2, dtype=torch.int64, device=device)
    q = torch.empty(2, 128, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="not a multiple of the quantization group"):
        run_kernel("moe_permute", device, x.data_ptr(), 0, src.data_ptr(), 0, q.data_ptr(), q.data_ptr(), 2, 100, 2,
                   True, False)  # fmt: skip
    with pytest.raises(ValueError, match="x: expected float32, bfloat16 or float16"):
        run_kernel("moe_permute", device, x.data_ptr(), 3, src.data_ptr(), x.data_ptr(), 0, 0, 2, 128, 2, False, False)
    topk_idx = torch.zeros(2, 2, dtype=torch.int32, device=device)
    counts = torch.empty(4, dtype=torch.int32, device=device)
    args = [topk_idx.data_ptr(), False, 2, 2, 4, True, 0, 8, 31, counts.data_ptr(), 0, counts.data_ptr(), 0, 0, 0, 0,
            0, 0]  # fmt: skip
    with pytest.raises(ValueError, match="src_token: expected 32 rows, got 31"):
        run_kernel("moe_layout_count", device, *args)
    args[4], args[8] = 2048, 2048 * 8
    with pytest.raises(ValueError, match="num_experts: expected 1..1024"):
        run_kernel("moe_layout_count", device, *args)


def test_registered_as_torch_custom_ops(device):
    topk_idx = _routed(6).to(device)
    layout = dsv3.moe_contiguous_layout(topk_idx, E)
    x = torch.randn(6, 256, device=device)
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.dsv3.moe_masked_layout.default, (topk_idx, E, 16), test_utils=checks)
    # M_sum depends on the data (a dynamic size on the CPU; the static bound on a GPU)
    torch.library.opcheck(torch.ops.dsv3.moe_contiguous_layout.default, (topk_idx, E, 128), test_utils=checks)
    torch.library.opcheck(torch.ops.dsv3.moe_permute.default, (x, layout.src_token, False, False), test_utils=checks)
    y = torch.randn(layout.m_indices.shape[0], 256, device=device)
    weights = torch.rand(6, 8, device=device)
    torch.library.opcheck(torch.ops.dsv3.moe_unpermute.default, (y, layout.row_of, weights), test_utils=checks)

    def moe_data_path(x, topk_idx, weights):
        layout = dsv3.moe_masked_layout(topk_idx, E, 16)
        return dsv3.unpermute_tokens_masked(dsv3.permute_tokens_masked(x, layout) * 2, layout, weights)

    def contiguous_data_path(x, topk_idx, weights):
        layout = dsv3.moe_contiguous_layout(topk_idx, E)
        return dsv3.unpermute_tokens(dsv3.permute_tokens(x, layout) * 2, layout, weights)

    for path in (moe_data_path, contiguous_data_path):
        compiled = torch.compile(path, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x, topk_idx, weights), path(x, topk_idx, weights))
