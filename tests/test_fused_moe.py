"""dsv3.ops.fused_experts (layout, grouped FP8 GEMMs, SiLU-and-mul, combine) vs dsv3.reference.fused_experts."""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.reference import fused_experts as reference_fused_experts
from dsv3.reference import grouped_topk
from dsv3.reference import quant as rq
from dsv3.testing import assert_close, calc_diff


def _experts(experts: int, hidden: int, intermediate: int, device):
    def stacked(n, k):
        pairs = [rq.per_block_quant_fp8(torch.randn(n, k) * 0.05) for _ in range(experts)]
        return torch.stack([q for q, _ in pairs]).to(device), torch.stack([s for _, s in pairs]).to(device)

    return stacked(2 * intermediate, hidden), stacked(hidden, intermediate)


def _routing(tokens: int, experts: int, topk: int, groups: int, device):
    logits = torch.randn(tokens, experts)
    weights, idx = grouped_topk(logits, torch.zeros(experts), topk, groups, max(groups // 2, 1), 2.5)
    return weights.to(device), idx.to(device)


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_matches_reference(device, tokens):
    w13, w2 = _experts(16, 256, 128, device)
    weights, idx = _routing(tokens, 16, 4, 4, device)
    x = torch.randn(tokens, 256).to(torch.bfloat16).to(device)
    out = dsv3.fused_experts(x, weights, idx, w13, w2)
    cpu = [t.cpu() for t in (x, weights, idx)]
    expected = reference_fused_experts(*cpu, tuple(t.cpu() for t in w13), tuple(t.cpu() for t in w2))
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    # the steps are exact but for the GEMMs' summation order
    assert_close(out.cpu().float(), expected.float(), atol=2e-3, rtol=2e-2, max_diff=1e-5)


def test_skewed_loads_empty_experts_and_missing_slots(device):
    w13, w2 = _experts(8, 256, 256, device)
    tokens = 64
    idx = torch.full((tokens, 4), -1, dtype=torch.int32)
    idx[:, 0] = 3  # every token to expert 3
    idx[::2, 1] = 5
    idx[5, 2] = 0  # a single token for expert 0; experts 1, 2, 4, 6, 7 get none
    weights = torch.rand(tokens, 4)
    x = torch.randn(tokens, 256).to(torch.bfloat16)
    out = dsv3.fused_experts(x.to(device), weights.to(device), idx.to(device), w13, w2)
    expected = reference_fused_experts(x, weights, idx, tuple(t.cpu() for t in w13), tuple(t.cpu() for t in w2))
    assert calc_diff(out.cpu().float(), expected.float()) < 1e-5
    no_expert = torch.full((1, 4), -1, dtype=torch.int32, device=device)
    lone = dsv3.fused_experts(x[:1].to(device), weights[:1].to(device), no_expert, w13, w2)
    assert torch.all(lone == 0)


def test_rejects_bad_input(device):
    w13, w2 = _experts(4, 256, 128, device)
    weights, idx = _routing(5, 4, 2, 2, device)
    x = torch.randn(5, 256).to(torch.bfloat16).to(device)
    with pytest.raises(TypeError, match="x: expected dtype bfloat16"):
        dsv3.fused_experts(x.float(), weights, idx, w13, w2)
    with pytest.raises(ValueError, match=r"w13: expected shape \[\*, \*, 256\]"):
        dsv3.fused_experts(x, weights, idx, (w13[0][:, :, :128].contiguous(), w13[1]), w2)
    with pytest.raises(ValueError, match=r"w2: expected shape \[4, 256, 128\]"):
        dsv3.fused_experts(x, weights, idx, w13, (w2[0][:3].contiguous(), w2[1][:3].contiguous()))
    with pytest.raises(ValueError, match=r"topk_weights: expected shape \[5, 2\]"):
        dsv3.fused_experts(x, weights[:, :1].contiguous(), idx, w13, w2)
    with pytest.raises(TypeError, match="w2: expected a \\(values, scales\\) pair"):
        dsv3.fused_experts(x, weights, idx, w13, w2[0])
    bad = idx.clone()
    bad[0, 0] = 4
    if device.type == "cpu":  # the GPU layout drops such slots and reports them through layout.check()
        with pytest.raises(ValueError, match="topk_idx"):
            dsv3.fused_experts(x, weights, bad, w13, w2)
