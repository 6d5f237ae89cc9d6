"""grouped_topk (DeepSeek-V3 noaux_tc routing) vs dsv3.reference.moe: the same experts, ties included, and the same
weights; on the CPU here and on the GPU through tests/cuda/test_moe_cuda.py (same tests, `device` overridden)."""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.reference import moe as ref
from dsv3.testing import assert_bitwise_equal, assert_close

# DeepSeek-V3: 256 routed experts in 8 groups, the best 4 groups kept, 8 experts per token, weights scaled by 2.5.
V3 = dict(topk=8, num_expert_group=8, topk_group=4, routed_scaling_factor=2.5)


def _assert_routes_like_reference(logits, bias, *, renormalize=True, **config):
    weights, idx = dsv3.grouped_topk(logits, bias, renormalize=renormalize, **config)
    expected_weights, expected_idx = ref.grouped_topk(logits.cpu(), bias.cpu(), renormalize=renormalize, **config)
    assert idx.dtype == torch.int32 and weights.dtype == torch.float32
    assert idx.device == logits.device and weights.device == logits.device
    assert torch.equal(idx.cpu(), expected_idx), "experts differ from the reference"
    assert_close(weights.cpu(), expected_weights, atol=1e-6, name="topk_weights")
    return weights, idx


def _router_inputs(tokens, experts, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen) * 2
    bias = torch.randn(experts, generator=gen) * 0.1
    return logits.to(dtype).to(device), bias.to(device)


@pytest.mark.parametrize("tokens", [1, 7, 300, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_deepseek_v3_routing_matches_reference(device, tokens, dtype):
    logits, bias = _router_inputs(tokens, 256, dtype, device, seed=tokens)
    weights, idx = _assert_routes_like_reference(logits, bias, **V3)
    for experts in idx.cpu().tolist():
        assert len(set(experts)) == 8 and len({e // 32 for e in experts}) <= 4  # distinct, from <= topk_group groups
    assert_close(weights.cpu().sum(1), torch.full((tokens,), 2.5), atol=1e-5, name="weights sum")


@pytest.mark.parametrize("renormalize", [True, False])
def test_weights_are_bitwise_equal_to_reference(device, renormalize):
    # 64 x 256 logits: torch computes every reference sigmoid on its vectorized path, which the kernels reproduce
    # bit for bit (its scalar tail path, past the last full vector, may differ by an ulp).
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("torch's vectorized sigmoid uses SLEEF's expf only on AVX2/AVX512 builds")
    logits, bias = _router_inputs(64, 256, torch.float32, device, seed=3)
    weights, idx = dsv3.grouped_topk(logits, bias, renormalize=renormalize, **V3)
    expected_weights, expected_idx = ref.grouped_topk(logits.cpu(), bias.cpu(), renormalize=renormalize, **V3)
    assert torch.equal(idx.cpu(), expected_idx)
    assert_bitwise_equal(weights.cpu(), expected_weights, "topk_weights")


@pytest.mark.parametrize(
    "experts,groups,topk_group,topk",
    [(160, 8, 3, 6), (64, 1, 1, 6), (8, 4, 2, 2), (4, 2, 1, 1), (1024, 32, 8, 32), (96, 32, 32, 16), (60, 6, 6, 7)],
)
def test_other_router_configurations(device, experts, groups, topk_group, topk):
    logits, bias = _router_inputs(37, experts, torch.float32, device, seed=experts)
    config = dict(topk=topk, num_expert_group=groups, topk_group=topk_group, routed_scaling_factor=1.0)
    _assert_routes_like_reference(logits, bias, **config)
    _assert_routes_like_reference(logits.to(torch.float16), bias, renormalize=False, **config)


def test_constant_logits_tie_to_lowest_indices(device):
    weights, idx = _assert_routes_like_reference(
        torch.zeros(5, 256, device=device), torch.zeros(256, device=device), **V3
    )
    assert idx.cpu().tolist() == [list(range(8))] * 5
    assert bool((weights.cpu() == 2.5 / 8).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coarse_values_tie_everywhere(device, seed):
    # Few distinct logits and biases: equal scores inside groups, equal group scores, equal experts across groups.
    gen = torch.Generator().manual_seed(seed)
    logits = ((torch.randn(300, 256, generator=gen) * 2).round() / 2).to(torch.bfloat16)
    bias = (torch.randn(256, generator=gen) * 20).round() / 200
    _assert_routes_like_reference(logits.to(device), bias.to(device), **V3)


def test_equal_biases_and_group_ties(device):
    # Every group has the same two best scores: the lower groups are kept, and within them ties go to lower experts.
    logits = torch.full((3, 256), -1.0)
    logits[:, 5::32] = 2.0
    logits[:, 6::32] = 2.0
    logits[1, 200] = 2.5  # group 6 now has the best group score
    bias = torch.full((256,), 0.25)
    _, idx = _assert_routes_like_reference(logits.to(device), bias.to(device), **V3)
    assert idx.cpu()[0].tolist() == [5, 6, 37, 38, 69, 70, 101, 102]
    assert idx.cpu()[1].tolist() == [200, 5, 6, 37, 38, 69, 70, 197]


def test_hand_made_example(device):
    logits = torch.tensor([[3.0, -3.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0]], device=device)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0], device=device)
    config = dict(topk=2, num_expert_group=4, topk_group=2)
    _, idx = _assert_routes_like_reference(logits, torch.zeros(8, device=device), routed_scaling_factor=1.0, **config)
    assert idx.cpu().tolist() == [[2, 3]]
    _, idx = _assert_routes_like_reference(logits, bias, routed_scaling_factor=2.5, **config)
    assert idx.cpu().tolist() == [[5, 2]]


def test_negative_biased_scores_come_from_kept_groups(device):
    logits = torch.tensor([[0.0, 0.0, 2.0, 1.0, 0.0, 0.0, 3.0, 0.5]], device=device)
    bias = torch.full((8,), -5.0, device=device)
    _, idx = _assert_routes_like_reference(logits, bias, topk=3, num_expert_group=4, topk_group=2,
                                           routed_scaling_factor=1.0)  # fmt: skip
    assert idx.cpu().tolist() == [[6, 2, 3]]


def test_extreme_logits(device):
    # Saturated sigmoids (1.0 and 0 / subnormal scores) and +-inf logits.
    logits = torch.randn(4, 256) * 60
    logits[0, :8] = float("inf")
    logits[1] = -200.0
    logits[1, 77] = -150.0
    logits[2, ::3] = -float("inf")
    _assert_routes_like_reference(logits.to(device), torch.zeros(256, device=device), renormalize=False, **V3)


def test_nan_logits_still_give_valid_experts(device):
    logits, bias = _router_inputs(16, 256, torch.float32, device)
    logits[3] = float("nan")
    logits[5, 17] = float("nan")
    _, idx = dsv3.grouped_topk(logits, bias, **V3)
    idx = idx.cpu()
    assert bool(((idx >= 0) & (idx < 256)).all())
    clean = torch.ones(16, dtype=torch.bool)
    clean[[3, 5]] = False
    assert torch.equal(idx[clean], ref.grouped_topk(logits.cpu(), bias.cpu(), **V3)[1][clean])


def test_no_tokens(device):
    weights, idx = dsv3.grouped_topk(torch.zeros(0, 256, device=device), torch.zeros(256, device=device), **V3)
    assert weights.shape == (0, 8) and idx.shape == (0, 8)


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_rejects_bad_input(device):
    logits, bias = _router_inputs(4, 256, torch.float32, device)
    with pytest.raises(TypeError, match="router_logits: expected dtype"):
        dsv3.grouped_topk(logits.double(), bias, **V3)
    with pytest.raises(ValueError, match="router_logits: expected 2 dimensions"):
        dsv3.grouped_topk(logits[0], bias, **V3)
    with pytest.raises(TypeError, match="correction_bias: expected dtype float32"):
        dsv3.grouped_topk(logits, bias.to(torch.bfloat16), **V3)
    with pytest.raises(ValueError, match=r"correction_bias: expected shape \[256\]"):
        dsv3.grouped_topk(logits, bias[:128], **V3)
    with pytest.raises(ValueError, match="num_expert_group=3 must divide E=256"):
        dsv3.grouped_topk(logits, bias, **{**V3, "num_expert_group": 3})
    with pytest.raises(ValueError, match="topk_group=9"):
        dsv3.grouped_topk(logits, bias, **{**V3, "topk_group": 9})
    with pytest.raises(ValueError, match="topk=129"):
        dsv3.grouped_topk(logits, bias, **{**V3, "topk": 129})
    with pytest.raises(ValueError, match="topk: expected a positive int"):
        dsv3.grouped_topk(logits, bias, **{**V3, "topk": 0})
    with pytest.raises(ValueError, match="router_logits: expected a contiguous tensor"):
        dsv3.grouped_topk(torch.zeros(256, 4, device=device).t(), bias, **V3)
    with pytest.raises(ValueError, match="num_expert_group=64"):  # groups of 4 but more groups than a warp's lanes
        dsv3.grouped_topk(logits, bias, **{**V3, "num_expert_group": 64})
    with pytest.raises(ValueError, match="topk=33"):
        dsv3.grouped_topk(logits, bias, **{**V3, "topk": 33})
    with pytest.raises(ValueError, match="router_logits: expected 1..1024 experts"):
        dsv3.grouped_topk(torch.zeros(1, 2048, device=device), torch.zeros(2048, device=device), **V3)


def test_kernel_entry_point_revalidates(device):
    from dsv3.ops.extension import run_kernel

    logits, bias = _router_inputs(2, 256, torch.float32, device)
    weights = torch.empty(2, 8, device=device)
    idx = torch.empty(2, 8, dtype=torch.int32, device=device)
    args = [logits.data_ptr(), 0, bias.data_ptr(), weights.data_ptr(), idx.data_ptr(), 2, 256, 8, 4, 8, 1.0, True]
    for position, value, message in [(7, 5, "num_expert_group=5"), (9, 200, "topk=200"), (1, 3, "router_logits"),
                                     (2, 0, "null pointer"), (8, 0, "topk_group=0")]:  # fmt: skip
        bad = list(args)
        bad[position] = value
        with pytest.raises(ValueError, match=message):
            run_kernel("grouped_topk", device, *bad)


def test_registered_as_torch_custom_op(device):
    logits, bias = _router_inputs(6, 256, torch.bfloat16, device)
    torch.library.opcheck(torch.ops.dsv3.grouped_topk.default, (logits, bias, 8, 8, 4, 2.5, True))

    def route(x, b):
        return dsv3.grouped_topk(x, b, **V3)

    compiled = torch.compile(route, backend="aot_eager", fullgraph=True)
    for got, expected in zip(compiled(logits, bias), route(logits, bias), strict=True):
        assert torch.equal(got, expected)
