"""The grouped GEMM tests of tests/test_grouped_gemm.py on the GPU, plus full-size expert shapes and graph capture."""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.reference import gemm as ref_gemm
from dsv3.testing import calc_diff
from tests.test_grouped_gemm import *  # noqa: F403  (the same tests, collected again with device=cuda)
from tests.test_grouped_gemm import _contiguous_rows, _weights


@pytest.mark.usefixtures("gemm_kernel")
def test_full_size_deepseek_experts():
    # 8 local experts, gate/up N=4096 K=7168 and down N=7168 K=2048, skewed loads with one empty expert
    counts = [700, 0, 3, 128, 1, 257, 64, 40]
    for n, k in ((4096, 7168), (7168, 2048)):
        qb, sb = _weights(len(counts), n, k, "cuda")
        m_indices = _contiguous_rows(counts, alignment=128).cuda()
        qa, sa = dsv3.per_token_group_quant_fp8(torch.randn(m_indices.numel(), k, device="cuda", dtype=torch.bfloat16))
        out = dsv3.m_grouped_fp8_gemm_nt_contiguous((qa, sa), (qb, sb), m_indices)
        expected = ref_gemm.m_grouped_fp8_gemm_nt_contiguous((qa, sa), (qb, sb), m_indices)
        assert calc_diff(out.float(), expected.float()) < 1e-5
        assert torch.all(out[m_indices == -1] == 0)


@pytest.mark.usefixtures("gemm_kernel")
def test_masked_replays_in_a_cuda_graph_with_new_counts():
    groups, m_max, n, k = 8, 64, 2048, 7168
    qb, sb = _weights(groups, n, k, "cuda")
    qa, sa = dsv3.per_token_group_quant_fp8(torch.randn(groups, m_max, k, device="cuda", dtype=torch.bfloat16))
    masked_m = torch.tensor([0, 1, 64, 7, 0, 33, 2, 5], dtype=torch.int32, device="cuda")
    out = torch.zeros(groups, m_max, n, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dsv3.m_grouped_fp8_gemm_nt_masked((qa, sa), (qb, sb), masked_m, expected_m=16, out=out)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            dsv3.m_grouped_fp8_gemm_nt_masked((qa, sa), (qb, sb), masked_m, expected_m=16, out=out)
    masked_m.copy_(torch.tensor([64, 0, 3, 9, 1, 0, 64, 2], dtype=torch.int32))
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    expected = ref_gemm.m_grouped_fp8_gemm_nt_masked((qa, sa), (qb, sb), masked_m)
    for g, rows in enumerate(masked_m.tolist()):
        assert calc_diff(out[g, :rows].float(), expected[g, :rows].float()) < 1e-5


@pytest.mark.usefixtures("gemm_kernel")
def test_contiguous_group_whose_rows_are_not_one_run_is_zeroed():
    """The GPU computes each group over one run of rows; a group split in two is skipped and its rows are zeroed
    (never a product over other groups' rows), the other groups are unaffected."""
    qb, sb = _weights(2, 256, 256, "cuda")
    m_indices = torch.tensor([0] * 5 + [1] * 3 + [0] * 2 + [-1] * 6, dtype=torch.int32, device="cuda")
    qa, sa = dsv3.per_token_group_quant_fp8(torch.randn(16, 256, device="cuda"))
    out = torch.full((16, 256), float("nan"), dtype=torch.bfloat16, device="cuda")
    dsv3.m_grouped_fp8_gemm_nt_contiguous((qa, sa), (qb, sb), m_indices, out=out)
    expected = ref_gemm.m_grouped_fp8_gemm_nt_contiguous((qa, sa), (qb, sb), m_indices)
    ones = m_indices == 1
    assert calc_diff(out[ones].float(), expected[ones].float()) < 1e-5
    assert torch.all(out[~ones] == 0)


@pytest.mark.usefixtures("gemm_kernel")
def test_masked_counts_outside_the_slab_are_clamped_to_it():
    """masked_m lives on the device, so the GPU cannot reject a count: below 0 it computes nothing, beyond m_max the
    whole slab; nothing outside the group's slab is written."""
    groups, m_max, n, k = 3, 40, 256, 256
    qb, sb = _weights(groups, n, k, "cuda")
    qa, sa = dsv3.per_token_group_quant_fp8(torch.randn(groups, m_max, k, device="cuda"))
    out = torch.full((groups, m_max, n), 7.0, dtype=torch.bfloat16, device="cuda")
    dsv3.m_grouped_fp8_gemm_nt_masked(
        (qa, sa), (qb, sb), torch.tensor([-3, m_max + 25, 2], dtype=torch.int32, device="cuda"), 8, out=out
    )
    clamped = torch.tensor([0, m_max, 2], dtype=torch.int32, device="cuda")
    expected = ref_gemm.m_grouped_fp8_gemm_nt_masked((qa, sa), (qb, sb), clamped)
    assert torch.all(out[0] == 7.0) and torch.all(out[2, 2:] == 7.0)
    assert calc_diff(out[1].float(), expected[1].float()) < 1e-5
    assert calc_diff(out[2, :2].float(), expected[2, :2].float()) < 1e-5


@pytest.mark.parametrize("expected_m", [1, 64])
def test_decode_kernel_takes_rows_past_expected_m_tile_after_tile(monkeypatch, expected_m):
    """DSV3_FP8_GEMM_KERNEL=decode, masked: the grid holds the tiles of expected_m tokens per group, and a group with
    more rows takes its further tiles in turn (3 tiles for 150 rows), with K split over clusters (8 CTAs at
    expected_m=1: 33 K blocks, the last partial); rows past each count stay as they were."""
    from tests.conftest import skip_if_smoke_failed

    skip_if_smoke_failed("decode")
    monkeypatch.setenv("DSV3_FP8_GEMM_KERNEL", "decode")
    groups, m_max, n, k = 3, 160, 264, 4112
    qb, sb = _weights(groups, n, k, "cuda")
    qa, sa = dsv3.per_token_group_quant_fp8(torch.randn(groups, m_max, k, device="cuda"))
    masked_m = torch.tensor([150, 0, 65], dtype=torch.int32, device="cuda")
    out = torch.full((groups, m_max, n), 7.0, dtype=torch.bfloat16, device="cuda")
    dsv3.m_grouped_fp8_gemm_nt_masked((qa, sa), (qb, sb), masked_m, expected_m, out=out)
    expected = ref_gemm.m_grouped_fp8_gemm_nt_masked((qa, sa), (qb, sb), masked_m)
    for g, rows in enumerate(masked_m.tolist()):
        assert calc_diff(out[g, :rows].float(), expected[g, :rows].float()) < 1e-5, f"group {g}"
        assert torch.all(out[g, rows:] == 7.0), f"group {g}: rows past masked_m written"
