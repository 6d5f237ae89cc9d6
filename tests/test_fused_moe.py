"""dsv3.ops.fused_experts (layout, grouped FP8 GEMMs, SiLU-and-mul, combine) vs dsv3.reference.fused_experts."""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.reference import fused_experts as reference_fused_experts
from dsv3.reference import grouped_topk
from dsv3.reference import quant as rq
from dsv3.reference.layers import silu_and_mul
from dsv3.testing import assert_bitwise_equal, assert_close, calc_diff

# On the CPU the steps are exact but for the GEMMs' fp32 summation order: outputs are held elementwise and to a
# calc_diff of 1e-5. Hopper's FP8 tensor cores keep only ~14 bits of their running sums, so on a GPU the bf16
# intermediate sometimes rounds the other way and its FP8 re-quantization moves a code (1/8 of its value) or a whole
# group's scale: no elementwise bound holds there, but the whole-tensor distance still separates a right result
# (< 2e-4) from one wrong expert slot among hundreds of tokens (~1e-3).
CUDA_MAX_DIFF = 2e-4


def assert_matches(out: torch.Tensor, expected: torch.Tensor, atol: float | None = None) -> None:
    """out (on any device) against the CPU reference; atol=None: calc_diff alone."""
    on_gpu = out.device.type == "cuda"
    out, expected = out.cpu().float(), expected.float()
    if on_gpu:
        assert torch.equal(out.isnan(), expected.isnan()), "NaN positions differ"
        diff = calc_diff(out, expected)
        assert diff < CUDA_MAX_DIFF, f"calc_diff {diff:.3e}"
    elif atol is None:
        assert calc_diff(out, expected) < 1e-5
    else:
        assert_close(out, expected, atol=atol, rtol=2e-2, max_diff=1e-5)


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
    assert_matches(out, expected, atol=2e-3)


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
    assert_matches(out, expected)
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
    q, scales = dsv3.per_token_group_quant_fp8(x)
    with pytest.raises(TypeError, match=r"x: expected a bf16 tensor or a \(values, scales\) pair"):
        dsv3.fused_experts((q, scales, scales), weights, idx, w13, w2)
    with pytest.raises(ValueError, match=r"x scales: expected shape \[5, 2\]"):
        dsv3.fused_experts((q, scales[:, :1].contiguous()), weights, idx, w13, w2)
    with pytest.raises(TypeError, match="x: expected dtype float8_e4m3fn"):
        dsv3.fused_experts((x, scales), weights, idx, w13, w2)
    bad = idx.clone()
    bad[0, 0] = 4
    if device.type == "cpu":  # the GPU layout drops such slots and reports them through layout.check()
        with pytest.raises(ValueError, match="topk_idx"):
            dsv3.fused_experts(x, weights, bad, w13, w2)


# ---------------------------------------------------------------------------------------------------------------------
# Every way of running it (the CPU's single call, contiguous and masked layouts) and the shared expert
# ---------------------------------------------------------------------------------------------------------------------

LAYOUTS = ("auto", "contiguous", "masked")


def _shared_expert(hidden: int, intermediate: int, device):
    w13 = rq.per_block_quant_fp8(torch.randn(2 * intermediate, hidden) * 0.05)
    w2 = rq.per_block_quant_fp8(torch.randn(hidden, intermediate) * 0.05)
    return tuple(t.to(device) for t in w13), tuple(t.to(device) for t in w2)


def _reference(x, weights, idx, w13, w2, shared=None):
    cpu = lambda pair: tuple(t.cpu() for t in pair)  # noqa: E731
    shared = {} if shared is None else {"shared_w13": cpu(shared[0]), "shared_w2": cpu(shared[1])}
    x = cpu(x) if isinstance(x, tuple) else x.cpu()
    return reference_fused_experts(x, weights.cpu(), idx.cpu(), cpu(w13), cpu(w2), **shared)


@pytest.mark.usefixtures("gemm_kernel")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 48])
def test_deepseek_routing_every_layout(device, layout, tokens):
    # DeepSeek-V3's router (256 experts, top-8 of 4 of 8 groups) at a reduced hidden size
    experts, hidden, intermediate = 256, 256, 128
    w13, w2 = _experts(experts, hidden, intermediate, device)
    logits = torch.randn(tokens, experts)
    bias = torch.randn(experts) * 0.5  # a skewed correction bias: some experts crowded, most empty
    weights, idx = grouped_topk(logits, bias, 8, 8, 4, 2.5)
    x = torch.randn(tokens, hidden).to(torch.bfloat16)
    out = dsv3.fused_experts(x.to(device), weights.to(device), idx.to(device), w13, w2, layout=layout)
    expected = _reference(x, weights, idx, w13, w2)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert_matches(out, expected, atol=2e-3)


@pytest.mark.usefixtures("gemm_kernel")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_skewed_empty_and_missing_slots_every_layout(device, layout):
    w13, w2 = _experts(8, 256, 256, device)
    tokens = 40
    idx = torch.full((tokens, 4), -1, dtype=torch.int32)
    idx[:, 0] = 6  # every token to expert 6
    idx[::3, 1] = 2
    idx[7, 3] = 0  # one token for expert 0; experts 1, 3, 4, 5, 7 get none; many slots have no expert
    weights = torch.rand(tokens, 4)
    x = torch.randn(tokens, 256).to(torch.bfloat16)
    out = dsv3.fused_experts(x.to(device), weights.to(device), idx.to(device), w13, w2, layout=layout)
    expected = _reference(x, weights, idx, w13, w2)
    assert_matches(out, expected)
    assert torch.all(out.cpu()[idx.eq(-1).all(1)] == 0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 33])
def test_shared_expert_every_layout(device, layout, tokens):
    hidden = 256
    w13, w2 = _experts(16, hidden, 128, device)
    shared = _shared_expert(hidden, 256, device)  # wider than a routed expert, as n_shared_experts > 1 makes it
    weights, idx = _routing(tokens, 16, 4, 4, device)
    x = torch.randn(tokens, hidden).to(torch.bfloat16)
    out = dsv3.fused_experts(x.to(device), weights, idx, w13, w2, *shared, layout=layout)
    expected = _reference(x, weights, idx, w13, w2, shared)
    assert_matches(out, expected, atol=4e-3)
    # with no routed slot at all, the output is the shared expert alone
    none = torch.full_like(idx, -1)
    alone = dsv3.fused_experts(x.to(device), weights, none, w13, w2, *shared, layout=layout)
    assert_matches(alone, _reference(x, weights, none, w13, w2, shared), atol=4e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 70])
def test_quantized_tokens_give_the_same_bits(device, layout, tokens):
    # what an FP8 expert-parallel dispatch delivers: the tokens as per_token_group_quant_fp8 quantizes them
    w13, w2 = _experts(16, 256, 128, device)
    shared = _shared_expert(256, 256, device)
    weights, idx = _routing(tokens, 16, 4, 4, device)
    x = (torch.randn(tokens, 256) * 3).to(torch.bfloat16).to(device)
    quantized = dsv3.per_token_group_quant_fp8(x)
    for extra in ((), shared):
        expected = dsv3.fused_experts(x, weights, idx, w13, w2, *extra, layout=layout)
        assert_bitwise_equal(dsv3.fused_experts(quantized, weights, idx, w13, w2, *extra, layout=layout), expected)
    assert torch.equal(_reference(quantized, weights, idx, w13, w2), _reference(x, weights, idx, w13, w2))


def test_reference_shared_expert_is_the_moe_layers_sum():
    # dsv3.reference.fused_experts with a shared expert = the routed output plus the shared MLP, both in bf16, as the
    # DeepSeek-V3 MoE layer computes them (the MLP's projections as separate FP8 linears)
    hidden, intermediate = 256, 128
    w13, w2 = _experts(4, hidden, intermediate, "cpu")
    (q13, s13), (q2, s2) = _shared_expert(hidden, intermediate, "cpu")
    weights, idx = _routing(9, 4, 2, 2, "cpu")
    x = torch.randn(9, hidden).to(torch.bfloat16)

    def linear(v, q, s):
        return dsv3.reference.fp8_gemm_nt(rq.per_token_group_quant_fp8(v), (q, s))

    gate = linear(x, q13[:intermediate], s13[: intermediate // 128])
    up = linear(x, q13[intermediate:], s13[intermediate // 128 :])
    shared = linear(silu_and_mul(torch.cat([gate, up], dim=-1)), q2, s2)
    expected = reference_fused_experts(x, weights, idx, w13, w2) + shared
    assert torch.equal(reference_fused_experts(x, weights, idx, w13, w2, (q13, s13), (q2, s2)), expected)


def test_cpu_single_call_matches_the_composed_kernels():
    # the one C++ call and the step-by-step kernels share the GEMMs; only SiLU's exp may differ in the last fp32 bit
    w13, w2 = _experts(32, 512, 256, "cpu")
    shared = _shared_expert(512, 256, "cpu")
    weights, idx = _routing(70, 32, 6, 4, "cpu")
    x = (torch.randn(70, 512) * 3).to(torch.bfloat16)
    x[3] = 0  # an all-zero token: its groups quantize with the floor scale
    x[5, :128] *= 1000  # far beyond the FP8 range
    fused = dsv3.fused_experts(x, weights, idx, w13, w2, *shared)
    composed = dsv3.fused_experts(x, weights, idx, w13, w2, *shared, layout="contiguous")
    assert calc_diff(fused.float(), composed.float()) < 1e-7
    assert (fused != composed).float().mean() < 0.01


def test_masked_rejects_an_expert_over_max_m(device):
    w13, w2 = _experts(4, 256, 128, device)
    idx = torch.zeros(6, 2, dtype=torch.int32, device=device)  # expert 0 twice per token: 12 rows
    weights = torch.ones(6, 2, device=device)
    x = torch.randn(6, 256).to(torch.bfloat16).to(device)
    out = dsv3.fused_experts(x, weights, idx, w13, w2, layout="masked", max_m=12)
    assert_matches(out, _reference(x, weights, idx, w13, w2))
    if device.type == "cpu":  # a GPU skips the overflow and counts it in the layout's errors
        with pytest.raises(ValueError, match="max_m"):
            dsv3.fused_experts(x, weights, idx, w13, w2, layout="masked")


def test_rejects_bad_layout_and_shared_arguments(device):
    w13, w2 = _experts(4, 256, 128, device)
    shared = _shared_expert(256, 128, device)
    weights, idx = _routing(3, 4, 2, 2, device)
    x = torch.randn(3, 256).to(torch.bfloat16).to(device)
    with pytest.raises(ValueError, match="layout: expected one of"):
        dsv3.fused_experts(x, weights, idx, w13, w2, layout="sparse")
    with pytest.raises(ValueError, match="max_m: expected a positive int"):
        dsv3.fused_experts(x, weights, idx, w13, w2, layout="masked", max_m=0)
    with pytest.raises(ValueError, match="shared_w13/shared_w2: pass both"):
        dsv3.fused_experts(x, weights, idx, w13, w2, shared_w13=shared[0])
    with pytest.raises(ValueError, match=r"shared_w2: expected shape \[256, 128\]"):
        dsv3.fused_experts(x, weights, idx, w13, w2, shared[0], (shared[1][0][:, :64].contiguous(), shared[1][1]))
    with pytest.raises(TypeError, match="shared_w13: expected a \\(values, scales\\) pair"):
        dsv3.fused_experts(x, weights, idx, w13, w2, shared[0][0], shared[1])


def test_thousands_of_tokens_with_shared_expert(device):
    # large enough that every elementwise pass of the CPU's single call runs on the thread team
    hidden = 512
    w13, w2 = _experts(16, hidden, 128, device)
    shared = _shared_expert(hidden, 128, device)
    weights, idx = _routing(2304, 16, 4, 4, device)
    x = torch.randn(2304, hidden).to(torch.bfloat16)
    out = dsv3.fused_experts(x.to(device), weights, idx, w13, w2, *shared)
    expected = _reference(x, weights, idx, w13, w2, shared)
    # routed and shared outputs are each rounded to bf16 before they are added: where they nearly cancel, one bf16
    # step of either (1/64 at magnitudes 2-4, which a few of these thousands of tokens reach) is the whole difference
    assert_matches(out, expected, atol=1 / 32)
