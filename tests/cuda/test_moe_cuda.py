"""The MoE routing and layout tests of tests/test_moe_routing.py and tests/test_moe_layout.py, run on the GPU
(tests/cuda/conftest.py sets `device`), plus what only a GPU has: CUDA-graph capture and large batches."""

from __future__ import annotations

import torch

import dsv3
from dsv3.reference import moe as ref
from dsv3.testing import assert_bitwise_equal
from tests.test_moe_layout import *  # noqa: F403  (the same tests, collected again with device=cuda)
from tests.test_moe_routing import *  # noqa: F403


def test_routing_and_layouts_at_prefill_size():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(8192, 256, generator=gen).to(torch.bfloat16)
    bias = torch.randn(256, generator=gen) * 0.1
    weights, idx = dsv3.grouped_topk(logits.cuda(), bias.cuda(), 8, 8, 4, 2.5)
    expected_weights, expected_idx = ref.grouped_topk(logits, bias, 8, 8, 4, 2.5)
    assert torch.equal(idx.cpu(), expected_idx)
    assert torch.allclose(weights.cpu(), expected_weights, rtol=0, atol=1e-6)
    layout = dsv3.moe_contiguous_layout(idx, 256)
    expected = ref.moe_contiguous_layout(expected_idx, 256)
    rows = expected.num_rows
    layout.check()
    assert_bitwise_equal(layout.m_indices[:rows].cpu(), expected.m_indices, "m_indices")
    assert_bitwise_equal(layout.row_of.cpu(), expected.row_of, "row_of")
    assert bool((layout.m_indices[rows:] == -1).all())


def test_masked_path_captures_in_a_cuda_graph():
    """Masked layout -> fused permute-and-quantize -> unpermute: no host synchronization, so it captures and
    replays on new routing."""
    tokens, hidden, max_m = 64, 7168, 64
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
    topk_idx = torch.randint(0, 256, (tokens, 8), dtype=torch.int32, device="cuda")
    weights = torch.rand(tokens, 8, device="cuda")
    y = torch.randn(256, max_m, hidden, dtype=torch.bfloat16, device="cuda")

    def step():
        layout = dsv3.moe_masked_layout(topk_idx, 256, max_m)
        q, scales = dsv3.permute_tokens_masked(x, layout, quantize=True)
        return layout, q, scales, dsv3.unpermute_tokens_masked(y, layout, weights)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # warm-up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            layout, q, scales, out = step()
    topk_idx.copy_(torch.randint(0, 256, (tokens, 8), dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    expected_layout, expected_q, expected_scales, expected_out = step()
    layout.check()
    for name in ("src_token", "masked_m", "row_of"):
        assert_bitwise_equal(getattr(layout, name), getattr(expected_layout, name), name)
    assert_bitwise_equal(q, expected_q, "q")
    assert_bitwise_equal(scales, expected_scales, "scales")
    assert_bitwise_equal(out, expected_out, "unpermuted")


def test_contiguous_layout_runs_on_current_stream_without_sync():
    topk_idx = torch.randint(-1, 256, (512, 8), dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        dsv3.moe_contiguous_layout(topk_idx, 256)
        with torch.cuda.graph(graph, stream=stream):
            layout = dsv3.moe_contiguous_layout(topk_idx, 256)  # a host sync would fail the capture
    graph.replay()
    torch.cuda.synchronize()
    expected = ref.moe_contiguous_layout(topk_idx.cpu(), 256)
    assert_bitwise_equal(layout.row_of.cpu(), expected.row_of, "row_of")
    assert_bitwise_equal(layout.expert_offsets.cpu(), expected.expert_offsets, "expert_offsets")
