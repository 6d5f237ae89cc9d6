"""Grouped (MoE) FP8 GEMMs vs dsv3.reference.gemm: contiguous and masked layouts, empty groups, padding rows."""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.reference import gemm as ref_gemm
from dsv3.reference import quant as ref_quant
from dsv3.testing import assert_close, calc_diff


def _weights(groups: int, n: int, k: int, device):
    w = torch.randn(groups, n, k) * 0.05
    pairs = [ref_quant.per_block_quant_fp8(w[g]) for g in range(groups)]
    return torch.stack([q for q, _ in pairs]).to(device), torch.stack([s for _, s in pairs]).to(device)


def _contiguous_rows(counts: list[int], alignment: int = 8) -> torch.Tensor:
    """m_indices for groups of `counts` rows each, every segment padded with -1 rows to `alignment`."""
    rows = []
    for g, count in enumerate(counts):
        rows += [g] * count + [-1] * (-count % alignment)
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.usefixtures("gemm_kernel")
@pytest.mark.parametrize("n", [256, 264])  # 264: three column tiles, the last partial
@pytest.mark.parametrize(
    "counts", [[3, 0, 17, 1], [0, 0, 0, 5], [40, 40, 40, 40], [0, 0, 0, 0], [130, 1, 0, 260], [5, 0, 0]]
)
def test_contiguous_matches_reference(device, counts, n):
    k = 384
    b = _weights(len(counts), n, k, device)
    m_indices = _contiguous_rows(counts)
    qa, sa = ref_quant.per_token_group_quant_fp8(torch.randn(m_indices.numel(), k))
    out = torch.full((m_indices.numel(), n), float("nan"), dtype=torch.bfloat16, device=device)
    returned = dsv3.m_grouped_fp8_gemm_nt_contiguous((qa.to(device), sa.to(device)), b, m_indices.to(device), out=out)
    expected = ref_gemm.m_grouped_fp8_gemm_nt_contiguous((qa, sa), (b[0].cpu(), b[1].cpu()), m_indices)
    assert returned is out and out.dtype == torch.bfloat16
    assert_close(out.cpu().float(), expected.float(), atol=1e-2, rtol=1e-2, max_diff=1e-5, name="out")
    assert torch.all(out.cpu()[m_indices == -1] == 0)  # written over the NaN they held


@pytest.mark.usefixtures("gemm_kernel")
def test_contiguous_rows_that_are_all_padding_come_out_zero(device):
    b = _weights(3, 128, 256, device)
    qa, sa = (t.to(device) for t in ref_quant.per_token_group_quant_fp8(torch.randn(24, 256)))
    out = torch.full((24, 128), float("nan"), dtype=torch.bfloat16, device=device)
    m_indices = torch.full((24,), -1, dtype=torch.int32, device=device)
    dsv3.m_grouped_fp8_gemm_nt_contiguous((qa, sa), b, m_indices, out=out)
    assert torch.all(out.cpu() == 0)


@pytest.mark.usefixtures("gemm_kernel")
def test_contiguous_over_more_groups_than_a_thread_block_lists_at_once(device):
    """1100 groups, most empty: the GPU lists the groups' tiles 1024 groups at a time."""
    groups, n, k = 1100, 128, 128
    qb = (torch.randn(groups, n, k) * 0.5).to(torch.float8_e4m3fn)
    sb = torch.rand(groups, 1, 1) + 0.5
    counts = [0] * groups
    for g, rows in ((0, 3), (5, 130), (1023, 2), (1024, 7), (1099, 1)):
        counts[g] = rows
    m_indices = _contiguous_rows(counts)
    qa, sa = ref_quant.per_token_group_quant_fp8(torch.randn(m_indices.numel(), k))
    out = dsv3.m_grouped_fp8_gemm_nt_contiguous(
        (qa.to(device), sa.to(device)), (qb.to(device), sb.to(device)), m_indices.to(device)
    )
    expected = ref_gemm.m_grouped_fp8_gemm_nt_contiguous((qa, sa), (qb, sb), m_indices)
    assert_close(out.cpu().float(), expected.float(), atol=1e-2, rtol=1e-2, max_diff=1e-5, name="out")


@pytest.mark.usefixtures("gemm_kernel")
def test_contiguous_deepseek_expert_shapes(device):
    # gate/up (N=4096 as 2 x 2048, K=7168) and down (N=7168, K=2048), scaled down in N for CPU time
    for n, k in ((512, 7168), (768, 2048)):
        b = _weights(3, n, k, device)
        m_indices = _contiguous_rows([5, 0, 9], alignment=16)
        qa, sa = ref_quant.per_token_group_quant_fp8(torch.randn(m_indices.numel(), k))
        out = dsv3.m_grouped_fp8_gemm_nt_contiguous((qa.to(device), sa.to(device)), b, m_indices.to(device))
        expected = ref_gemm.m_grouped_fp8_gemm_nt_contiguous((qa, sa), (b[0].cpu(), b[1].cpu()), m_indices)
        assert calc_diff(out.cpu().float(), expected.float()) < 1e-5


@pytest.mark.usefixtures("gemm_kernel")
@pytest.mark.parametrize("n", [256, 264])
@pytest.mark.parametrize(
    "masked,m_max", [([0, 3, 16, 1], 16), ([16, 16, 16, 16], 16), ([0, 0, 0, 0], 16), ([200, 0, 129, 7], 200)]
)
def test_masked_matches_reference_on_valid_rows(device, masked, m_max, n):
    groups, k = len(masked), 512
    b = _weights(groups, n, k, device)
    qa, sa = ref_quant.per_token_group_quant_fp8(torch.randn(groups, m_max, k))
    masked_m = torch.tensor(masked, dtype=torch.int32)
    out = torch.full((groups, m_max, n), 7.0, dtype=torch.bfloat16, device=device)
    returned = dsv3.m_grouped_fp8_gemm_nt_masked(
        (qa.to(device), sa.to(device)), b, masked_m.to(device), expected_m=4, out=out
    )
    assert returned is out
    expected = ref_gemm.m_grouped_fp8_gemm_nt_masked((qa, sa), (b[0].cpu(), b[1].cpu()), masked_m)
    for g, rows in enumerate(masked):
        assert_close(out[g, :rows].cpu().float(), expected[g, :rows].float(), atol=1e-2, rtol=1e-2, max_diff=1e-5)
        assert torch.all(out[g, rows:].cpu() == 7.0)  # rows past masked_m are left as they were


def test_grouped_ops_reject_bad_input(device):
    b = _weights(2, 128, 256, device)
    qa, sa = (t.to(device) for t in ref_quant.per_token_group_quant_fp8(torch.randn(8, 256)))
    m_indices = torch.zeros(8, dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="m_indices: expected dtype int32"):
        dsv3.m_grouped_fp8_gemm_nt_contiguous((qa, sa), b, m_indices.long())
    with pytest.raises(ValueError, match=r"m_indices: expected shape \[8\]"):
        dsv3.m_grouped_fp8_gemm_nt_contiguous((qa, sa), b, m_indices[:4].contiguous())
    with pytest.raises(ValueError, match="b: K=256 does not match a's K=128"):
        q2, s2 = (t.to(device) for t in ref_quant.per_token_group_quant_fp8(torch.randn(8, 128)))
        dsv3.m_grouped_fp8_gemm_nt_contiguous((q2, s2), b, m_indices)
    with pytest.raises(ValueError, match=r"b scales: expected shape \[2, 1, 2\]"):
        dsv3.m_grouped_fp8_gemm_nt_contiguous((qa, sa), (b[0], b[1][:, :, :1].contiguous()), m_indices)
    if device.type == "cpu":  # the CPU kernel validates indices; the GPU skips out-of-range groups
        with pytest.raises(ValueError, match=r"m_indices\[3\]=2"):
            bad = m_indices.clone()
            bad[3] = 2
            dsv3.m_grouped_fp8_gemm_nt_contiguous((qa, sa), b, bad)
        with pytest.raises(ValueError, match=r"masked_m\[1\]=9"):
            qm, sm = qa.view(2, 4, 256), sa.view(2, 4, 2)
            dsv3.m_grouped_fp8_gemm_nt_masked((qm, sm), b, torch.tensor([1, 9], dtype=torch.int32), expected_m=2)
    with pytest.raises(ValueError, match="b: 2 groups, but a has 4"):
        dsv3.m_grouped_fp8_gemm_nt_masked(
            (qa.view(4, 2, 256), sa.view(4, 2, 2)), b, torch.zeros(4, dtype=torch.int32, device=device), expected_m=1
        )
