"""dsv3.reference.moe: routing vs a brute-force per-token loop, layouts and (un)permutation vs explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsv3.reference import (
    ContiguousLayout,
    fp8_gemm_nt,
    grouped_topk,
    m_grouped_fp8_gemm_nt_contiguous,
    moe_contiguous_layout,
    moe_masked_layout,
    per_block_quant_fp8,
    per_token_group_quant_fp8,
    permute_tokens,
    permute_tokens_masked,
    unpermute_tokens,
    unpermute_tokens_masked,
)
from dsv3.testing import assert_bitwise_equal, assert_close

# ---------------------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------------------


def route_one_token(scores, bias, topk, num_groups, topk_group, scaling, renormalize):
    """The router for one token, as plain Python over numpy float32 scalars (IEEE fp32 like the tensor code)."""
    num_experts = len(scores)
    group_size = num_experts // num_groups
    biased = [np.float32(s) + np.float32(b) for s, b in zip(scores, bias, strict=True)]
    group_score = []
    for g in range(num_groups):
        best = sorted(biased[g * group_size : (g + 1) * group_size], reverse=True)
        group_score.append(best[0] + best[1])
    kept = sorted(range(num_groups), key=lambda g: (-group_score[g], g))[:topk_group]
    candidates = [e for e in range(num_experts) if e // group_size in kept]
    chosen = sorted(candidates, key=lambda e: (-biased[e], e))[:topk]
    weights = [np.float32(scores[e]) for e in chosen]
    if renormalize:
        total = weights[0]
        for w in weights[1:]:
            total = total + w
        weights = [w / total for w in weights]
    return chosen, [w * np.float32(scaling) for w in weights]


def route_brute_force(logits, bias, topk, num_groups, topk_group, scaling, renormalize=True):
    scores = torch.sigmoid(logits.float()).numpy()
    bias = bias.float().numpy()
    idx, weights = zip(
        *(route_one_token(row, bias, topk, num_groups, topk_group, scaling, renormalize) for row in scores),
        strict=True,
    )
    return torch.tensor(np.array(weights, dtype=np.float32)), torch.tensor(idx, dtype=torch.int32)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("coarse", [False, True], ids=["distinct", "many-ties"])
def test_grouped_topk_matches_brute_force_on_deepseek_v3_shape(renormalize, coarse):
    gen = torch.Generator().manual_seed(int(coarse))
    logits = torch.randn(48, 256, generator=gen)
    bias = torch.randn(256, generator=gen) * 0.1
    if coarse:  # few distinct values: ties between experts and between groups everywhere
        logits = (logits * 2).round() / 2
        bias = (bias * 20).round() / 20
    logits = logits.to(torch.bfloat16)
    weights, idx = grouped_topk(logits, bias, 8, 8, 4, 2.5, renormalize)
    expected_weights, expected_idx = route_brute_force(logits, bias, 8, 8, 4, 2.5, renormalize)
    assert idx.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(idx, expected_idx)
    assert_bitwise_equal(weights, expected_weights, name="weights")


def test_grouped_topk_hand_made_example():
    # 8 experts in 4 groups of 2; keep 2 groups, pick 2 experts.
    logits = torch.tensor([[3.0, -3.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0]])
    sigmoid = [1 / (1 + math.exp(-v)) for v in logits[0].tolist()]
    # Unbiased: group scores 1.0, 1.46, 1.25, 1.0 keep groups 1 and 2. Expert 0 has the best score but its group
    # loses; experts 2 and 3 tie and the lower index comes first.
    weights, idx = grouped_topk(logits, torch.zeros(8), 2, 4, 2, 1.0)
    assert idx.tolist() == [[2, 3]]
    assert_close(weights, torch.tensor([[0.5, 0.5]], dtype=torch.float64), rtol=1e-6, name="weights")
    # Bias +0.5 on expert 5 lifts group 2 to 1.74 and makes expert 5 the first pick; weights stay unbiased.
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0])
    weights, idx = grouped_topk(logits, bias, 2, 4, 2, 2.5)
    assert idx.tolist() == [[5, 2]]
    total = sigmoid[5] + sigmoid[2]
    expected = torch.tensor([[sigmoid[5] / total * 2.5, sigmoid[2] / total * 2.5]], dtype=torch.float64)
    assert_close(weights, expected, rtol=1e-6, name="biased weights")


def test_grouped_topk_negative_biased_scores_still_come_from_kept_groups():
    # A large negative bias makes every biased score negative; dropped groups' experts must still never be picked
    # (masking them with 0 instead of -inf would pick experts 0 and 1 here).
    logits = torch.tensor([[0.0, 0.0, 2.0, 1.0, 0.0, 0.0, 3.0, 0.5]])
    weights, idx = grouped_topk(logits, torch.full((8,), -5.0), 3, 4, 2, 1.0)
    assert idx.tolist() == [[6, 2, 3]]
    assert bool((weights > 0).all())


def test_grouped_topk_all_equal_logits_pick_lowest_indices():
    weights, idx = grouped_topk(torch.zeros(3, 256), torch.zeros(256), 8, 8, 4, 2.5)
    assert idx.tolist() == [list(range(8))] * 3
    assert bool((weights == 2.5 / 8).all())


def test_grouped_topk_rejects_bad_configuration():
    with pytest.raises(ValueError, match="topk"):
        grouped_topk(torch.zeros(1, 16), torch.zeros(16), 9, 4, 2, 1.0)  # 2 kept groups hold only 8 experts
    with pytest.raises(ValueError, match="num_expert_group"):
        grouped_topk(torch.zeros(1, 16), torch.zeros(16), 2, 3, 2, 1.0)
    with pytest.raises(ValueError, match="correction_bias"):
        grouped_topk(torch.zeros(1, 16), torch.zeros(8), 2, 4, 2, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------------------


def random_topk_idx(tokens: int, k: int, num_experts: int, seed: int) -> torch.Tensor:
    """Distinct experts per token drawn from the upper half of the range (so low experts stay empty), ~20% dropped."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_experts // 2, generator=gen)[:k] + num_experts // 2 for _ in range(tokens)]
    idx = torch.stack(rows).to(torch.int32)
    idx[torch.rand(tokens, k, generator=gen) < 0.2] = -1
    return idx


def test_contiguous_layout_hand_made_example():
    topk_idx = torch.tensor([[1, 3], [1, -1], [3, 1]], dtype=torch.int32)
    layout = moe_contiguous_layout(topk_idx, num_experts=4, alignment=4)
    assert layout.m_indices.dtype == torch.int32
    assert layout.m_indices.tolist() == [1, 1, 1, -1, 3, 3, -1, -1]
    assert layout.src_token.tolist() == [0, 1, 2, -1, 0, 2, -1, -1]
    assert layout.src_slot.tolist() == [0, 0, 1, -1, 1, 0, -1, -1]
    assert layout.row_of.tolist() == [[0, 4], [1, -1], [5, 2]]
    assert layout.tokens_per_expert.tolist() == [0, 3, 0, 2]
    assert layout.expert_offsets.tolist() == [0, 0, 4, 4, 8]
    assert layout.num_rows == 8


def check_contiguous_layout(layout: ContiguousLayout, topk_idx: torch.Tensor, num_experts: int, alignment: int):
    offsets = layout.expert_offsets.tolist()
    assert offsets[0] == 0 and layout.m_indices.numel() == offsets[-1]
    for e in range(num_experts):
        pairs = [(t, s) for t in range(topk_idx.shape[0]) for s in range(topk_idx.shape[1]) if topk_idx[t, s] == e]
        start, stop = offsets[e], offsets[e + 1]
        assert stop - start == -(-len(pairs) // alignment) * alignment
        assert int(layout.tokens_per_expert[e]) == len(pairs)
        real = range(start, start + len(pairs))
        assert [(int(layout.src_token[r]), int(layout.src_slot[r])) for r in real] == pairs
        assert layout.m_indices[start : start + len(pairs)].eq(e).all()
        assert layout.m_indices[start + len(pairs) : stop].eq(-1).all()
        assert layout.src_token[start + len(pairs) : stop].eq(-1).all()
        for r, (t, s) in zip(real, pairs, strict=True):
            assert int(layout.row_of[t, s]) == r
    assert torch.equal(layout.row_of.eq(-1), topk_idx.eq(-1))


@pytest.mark.parametrize("tokens,k,alignment", [(1, 8, 128), (37, 8, 128), (20, 4, 1), (9, 3, 4)])
def test_contiguous_layout_invariants(tokens, k, alignment):
    topk_idx = random_topk_idx(tokens, k, num_experts=16, seed=tokens)
    layout = moe_contiguous_layout(topk_idx, 16, alignment)
    check_contiguous_layout(layout, topk_idx, 16, alignment)


def test_contiguous_layout_with_no_routed_slot_is_empty():
    layout = moe_contiguous_layout(torch.full((3, 2), -1, dtype=torch.int32), 4)
    assert layout.num_rows == 0 and layout.m_indices.numel() == 0
    y = torch.zeros(0, 5, dtype=torch.bfloat16)
    assert bool((unpermute_tokens(y, layout, torch.ones(3, 2)) == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 23])
def test_permute_unpermute_contiguous(tokens, dtype):
    gen = torch.Generator().manual_seed(tokens)
    k, hidden = 6, 40
    topk_idx = random_topk_idx(tokens, k, 16, seed=100 + tokens)
    if tokens > 1:
        topk_idx[1] = -1  # a token routed nowhere
    layout = moe_contiguous_layout(topk_idx, 16, alignment=8)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)

    permuted = permute_tokens(x, layout)
    expected = torch.zeros(layout.num_rows, hidden, dtype=dtype)
    for r in range(layout.num_rows):
        if int(layout.src_token[r]) >= 0:
            expected[r] = x[int(layout.src_token[r])]
    assert_bitwise_equal(permuted, expected, name="permuted")

    y = torch.randn(layout.num_rows, hidden, generator=gen).to(dtype)
    y[layout.m_indices < 0] = float("nan")  # padding rows are never read
    weights = torch.rand(tokens, k, generator=gen)
    weights[topk_idx < 0] = float("nan")  # nor the weights of unrouted slots
    out = unpermute_tokens(y, layout, weights)
    assert out.dtype == dtype
    expected = torch.zeros(tokens, hidden, dtype=torch.float32)
    for t in range(tokens):
        for s in range(k):
            if topk_idx[t, s] >= 0:
                expected[t] = expected[t] + weights[t, s] * y[int(layout.row_of[t, s])].float()
    assert_bitwise_equal(out, expected.to(dtype), name="unpermuted")


@pytest.mark.parametrize("tokens", [1, 30])
def test_round_trip_is_bitwise_identity(tokens):
    topk_idx = random_topk_idx(tokens, 8, 32, seed=200 + tokens)
    topk_idx[0, 0] = 20  # at least one routed slot
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x[0, :3] = torch.tensor([3e38, 1e-40, -1e-38])  # near the top of the range, subnormal, tiny
    # Weight 1 on each token's first routed slot, 0 on the others: the sum must reproduce x exactly.
    routed = topk_idx >= 0
    first = routed & (routed.cumsum(dim=1) == 1)
    weights = first.float()
    has_expert = routed.any(dim=1)
    expected = torch.where(has_expert[:, None], x, torch.zeros_like(x))

    layout = moe_contiguous_layout(topk_idx, 32)
    out = unpermute_tokens(permute_tokens(x, layout), layout, weights)
    assert_bitwise_equal(out, expected, name="contiguous")

    masked = moe_masked_layout(topk_idx, 32, max_m=8 * tokens)
    out = unpermute_tokens_masked(permute_tokens_masked(x, masked), masked, weights)
    assert_bitwise_equal(out, expected, name="masked")


def test_masked_layout_and_permutation():
    topk_idx = torch.tensor([[1, 3], [1, -1], [3, 1], [0, 1]], dtype=torch.int32)
    layout = moe_masked_layout(topk_idx, num_experts=5, max_m=4)
    assert layout.masked_m.dtype == torch.int32 and layout.masked_m.tolist() == [1, 4, 0, 2, 0]
    assert layout.src_token.tolist() == [[3, -1, -1, -1], [0, 1, 2, 3], [-1] * 4, [0, 2, -1, -1], [-1] * 4]
    assert layout.src_slot.tolist() == [[0, -1, -1, -1], [0, 0, 1, 1], [-1] * 4, [1, 0, -1, -1], [-1] * 4]
    assert layout.row_of.tolist() == [[4, 12], [5, -1], [13, 6], [0, 7]]
    assert layout.max_m == 4

    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    permuted = permute_tokens_masked(x, layout)
    assert permuted.shape == (5, 4, 16)
    for e in range(5):
        for i in range(4):
            t = int(layout.src_token[e, i])
            assert torch.equal(permuted[e, i], x[t] if t >= 0 else torch.zeros(16, dtype=torch.bfloat16))

    y = torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(3))
    y[2] = float("nan")  # rows beyond masked_m are never read
    y[3, 2:] = float("nan")
    weights = torch.rand(4, 2, generator=torch.Generator().manual_seed(4))
    out = unpermute_tokens_masked(y, layout, weights)
    expected = torch.stack(
        [
            sum(weights[t, s] * y.view(20, 16)[int(layout.row_of[t, s])] for s in range(2) if topk_idx[t, s] >= 0)
            for t in range(4)
        ]
    )
    assert_close(out, expected, rtol=1e-6, atol=1e-7, name="unpermuted")


def test_masked_layout_overflow_raises():
    topk_idx = torch.tensor([[0], [0], [0]], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_m"):
        moe_masked_layout(topk_idx, num_experts=2, max_m=2)
    with pytest.raises(ValueError, match="topk_idx"):
        moe_contiguous_layout(torch.tensor([[2]], dtype=torch.int32), num_experts=2)


def test_layout_drives_the_contiguous_grouped_gemm():
    """permute -> grouped GEMM -> unpermute equals, per token, the weighted sum of dense GEMMs with its experts."""
    gen = torch.Generator().manual_seed(5)
    tokens, k, experts, hidden, inter = 11, 3, 6, 256, 128
    topk_idx = random_topk_idx(tokens, k, experts, seed=6)
    weights = torch.rand(tokens, k, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    w = [per_block_quant_fp8(torch.randn(inter, hidden, generator=gen) * 0.05) for _ in range(experts)]
    qb, sb = torch.stack([q for q, _ in w]), torch.stack([s for _, s in w])

    layout = moe_contiguous_layout(topk_idx, experts, alignment=4)
    a = per_token_group_quant_fp8(permute_tokens(x, layout))
    y = m_grouped_fp8_gemm_nt_contiguous(a, (qb, sb), layout.m_indices)
    out = unpermute_tokens(y, layout, weights)

    expected = torch.zeros(tokens, inter, dtype=torch.float64)
    for t in range(tokens):
        for s in range(k):
            e = int(topk_idx[t, s])
            if e >= 0:
                expected[t] += (
                    float(weights[t, s]) * fp8_gemm_nt(per_token_group_quant_fp8(x[t : t + 1]), w[e])[0].double()
                )
    assert_close(out, expected, rtol=2**-7, atol=1e-3, max_diff=1e-5, name="moe output")
