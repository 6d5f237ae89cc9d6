"""The fused-experts tests of tests/test_fused_moe.py on the GPU (tests/cuda/conftest.py sets `device`), plus the
decode path captured in a CUDA graph and the automatic layout choice."""

import pytest
import torch

import dsv3
from dsv3.ops.fused_moe import MASKED_MAX_TOKENS
from dsv3.reference import grouped_topk
from tests.test_fused_moe import *  # noqa: F403
from tests.test_fused_moe import _experts, _reference, _shared_expert, assert_matches


@pytest.mark.usefixtures("gemm_kernel")
@pytest.mark.parametrize("shared", [False, True])
def test_masked_decode_replays_in_a_cuda_graph_with_new_routing(shared):
    # a decode step: the masked layout keeps every count on the device, so the whole call is captured once and
    # replayed for new tokens and new routing
    experts, hidden, intermediate, tokens = 256, 512, 256, 8
    w13, w2 = _experts(experts, hidden, intermediate, "cuda")
    shared_weights = _shared_expert(hidden, intermediate, "cuda") if shared else (None, None)

    def routing():
        weights, idx = grouped_topk(torch.randn(tokens, experts), torch.randn(experts) * 0.3, 8, 8, 4, 2.5)
        return weights.cuda(), idx.cuda(), torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)

    weights, idx, x = routing()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dsv3.fused_experts(x, weights, idx, w13, w2, *shared_weights)  # "auto" is masked at this size
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = dsv3.fused_experts(x, weights, idx, w13, w2, *shared_weights)
    for _ in range(2):
        new_weights, new_idx, new_x = routing()
        weights.copy_(new_weights)
        idx.copy_(new_idx)
        x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        expected = _reference(x, weights, idx, w13, w2, shared_weights if shared else None)
        assert_matches(out, expected)


def test_auto_layout_switches_at_the_decode_threshold():
    # both sides of MASKED_MAX_TOKENS give the reference's result
    w13, w2 = _experts(64, 256, 128, "cuda")
    for tokens in (MASKED_MAX_TOKENS, MASKED_MAX_TOKENS + 1):
        weights, idx = grouped_topk(torch.randn(tokens, 64), torch.zeros(64), 8, 8, 4, 2.5)
        x = torch.randn(tokens, 256).to(torch.bfloat16)
        out = dsv3.fused_experts(x.cuda(), weights.cuda(), idx.cuda(), w13, w2)
        expected = _reference(x, weights, idx, w13, w2)
        assert_matches(out, expected)
