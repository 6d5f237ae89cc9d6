"""dsv3.reference.gemm against independent float64 dequantize-then-matmul and against unquantized products."""

from __future__ import annotations

import pytest
import torch

from dsv3.reference import (
    FP8_DTYPE,
    ceil_div,
    fp8_gemm_nt,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
    per_block_quant_fp8,
    per_token_group_quant_fp8,
)
from dsv3.testing import assert_bitwise_equal, assert_close, calc_diff

E4M3_NAN = 0x7F  # the e4m3fn bit pattern of NaN


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group quantization for any K: zero padding to a multiple of 128 cannot change a group's amax."""
    m, k = x.shape
    padded = x.new_zeros(m, ceil_div(k, 128) * 128)
    padded[:, :k] = x
    q, s = per_token_group_quant_fp8(padded)
    return q[:, :k].contiguous(), s


def random_fp8(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random e4m3 values spread over the whole representable range (NaN excluded)."""
    return (torch.randn(shape, generator=gen) * 64).clamp(-448, 448).to(FP8_DTYPE)


def random_scales(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Distinct positive scales, so a scale applied to the wrong block or channel group changes the result."""
    return torch.exp2(torch.randint(-12, -4, shape, generator=gen).float()) * (1 + torch.rand(shape, generator=gen))


def dequant_loop_f64(q: torch.Tensor, s: torch.Tensor, rows_per_scale: int) -> torch.Tensor:
    """float64 dequantization written as an explicit loop over scale tiles (rows_per_scale x 128)."""
    out = q.double().clone()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows = slice(i * rows_per_scale, (i + 1) * rows_per_scale)
            cols = slice(j * 128, (j + 1) * 128)
            out[rows, cols] *= float(s[i, j])
    return out


def random_operands(m: int, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    qa, sa = random_fp8((m, k), gen), random_scales((m, ceil_div(k, 128)), gen)
    qb, sb = random_fp8((n, k), gen), random_scales((ceil_div(n, 128), ceil_div(k, 128)), gen)
    return (qa, sa), (qb, sb)


@pytest.mark.parametrize(
    "m,n,k",
    [(1, 576, 7168), (37, 300, 200), (128, 256, 128), (5, 1, 129), (3, 129, 1), (0, 64, 256)],
)
def test_fp8_gemm_nt_equals_float64_dequantized_product(m, n, k):
    a, b = random_operands(m, n, k, seed=m * 1000 + n + k)
    expected = dequant_loop_f64(*a, rows_per_scale=1) @ dequant_loop_f64(*b, rows_per_scale=128).T
    out = fp8_gemm_nt(a, b, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    magnitude = float(expected.abs().max()) if expected.numel() else 1.0
    assert_close(out, expected, atol=2e-6 * magnitude, max_diff=1e-10, name="fp32 out")
    # The bf16 result is the same fp32 product rounded once.
    assert_bitwise_equal(fp8_gemm_nt(a, b), out.to(torch.bfloat16), name="bf16 out")


@pytest.mark.parametrize("m,n,k", [(1, 576, 7168), (64, 512, 384), (7, 200, 300)])
def test_fp8_gemm_nt_close_to_unquantized_product(m, n, k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
    w[:128, :128] = 0  # an all-zero block takes the amax floor and must contribute exactly nothing
    x[0, :64] *= 1e4  # beyond the FP8 range before scaling
    out = fp8_gemm_nt(quantize_activation(x), per_block_quant_fp8(w))
    expected = x.double() @ w.double().T
    assert out.dtype == torch.bfloat16
    assert calc_diff(out, expected) < 1e-3
    # The measure separates right from wrong: weight scales applied to the wrong blocks are caught.
    qb, sb = per_block_quant_fp8(w)
    wrong = fp8_gemm_nt(quantize_activation(x), (qb, sb.flip(0)))
    assert calc_diff(wrong, expected) > 1e-2


def test_grouped_contiguous_equals_dense_per_group():
    gen = torch.Generator().manual_seed(7)
    groups, n, k = 4, 192, 320
    # Segments for groups 0, 2, 3 (group 1 empty) with -1 padding rows, plus a few out-of-order rows.
    m_indices = torch.tensor([0] * 5 + [-1] * 3 + [2] * 9 + [3] * 1 + [-1] * 2 + [0, 3, 2], dtype=torch.int32)
    m_sum = m_indices.numel()
    qa, sa = random_fp8((m_sum, k), gen), random_scales((m_sum, ceil_div(k, 128)), gen)
    qa.view(torch.uint8)[m_indices < 0] = E4M3_NAN  # padding rows are never read
    qb = random_fp8((groups, n, k), gen)
    sb = random_scales((groups, ceil_div(n, 128), ceil_div(k, 128)), gen)

    out = m_grouped_fp8_gemm_nt_contiguous((qa, sa), (qb, sb), m_indices, out_dtype=torch.float32)
    assert out.shape == (m_sum, n)
    assert bool((out[m_indices < 0] == 0).all())
    for r in range(m_sum):
        g = int(m_indices[r])
        if g < 0:
            continue
        expected = dequant_loop_f64(qa[r : r + 1], sa[r : r + 1], 1) @ dequant_loop_f64(qb[g], sb[g], 128).T
        assert_close(out[r : r + 1], expected, atol=2e-6 * float(expected.abs().max()), name=f"row {r}")
    out_bf16 = m_grouped_fp8_gemm_nt_contiguous((qa, sa), (qb, sb), m_indices)
    assert out_bf16.dtype == torch.bfloat16
    assert_close(out_bf16, out, rtol=2**-8, name="bf16 out")


def test_grouped_masked_equals_dense_per_group():
    gen = torch.Generator().manual_seed(11)
    groups, m_max, n, k = 3, 8, 130, 256
    masked_m = torch.tensor([0, 3, 8], dtype=torch.int32)
    qa = random_fp8((groups, m_max, k), gen)
    sa = random_scales((groups, m_max, ceil_div(k, 128)), gen)
    qa.view(torch.uint8)[1, 3:] = E4M3_NAN  # rows beyond masked_m are never read
    qb = random_fp8((groups, n, k), gen)
    sb = random_scales((groups, ceil_div(n, 128), ceil_div(k, 128)), gen)

    out = m_grouped_fp8_gemm_nt_masked((qa, sa), (qb, sb), masked_m, expected_m=4, out_dtype=torch.float32)
    assert out.shape == (groups, m_max, n)
    for g in range(groups):
        m = int(masked_m[g])
        assert bool((out[g, m:] == 0).all())
        if m:
            expected = dequant_loop_f64(qa[g, :m], sa[g, :m], 1) @ dequant_loop_f64(qb[g], sb[g], 128).T
            assert_close(out[g, :m], expected, atol=2e-6 * float(expected.abs().max()), name=f"group {g}")
    hinted = m_grouped_fp8_gemm_nt_masked((qa, sa), (qb, sb), masked_m, expected_m=1, out_dtype=torch.float32)
    assert_bitwise_equal(hinted, out, name="expected_m is only a hint")


def test_bad_arguments_raise_value_error():
    a, b = random_operands(4, 128, 256, seed=0)
    with pytest.raises(ValueError, match="b scales"):
        fp8_gemm_nt(a, (b[0], b[1].T.contiguous()[:1]))
    with pytest.raises(ValueError, match="K="):
        fp8_gemm_nt(a, (b[0][:, :128], b[1][:, :1]))
    with pytest.raises(ValueError, match="values must be"):
        fp8_gemm_nt((a[0].float(), a[1]), b)
    grouped_b = (b[0][None], b[1][None])
    with pytest.raises(ValueError, match="m_indices"):
        m_grouped_fp8_gemm_nt_contiguous(a, grouped_b, torch.tensor([0, 1, 0, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match="masked_m"):
        m_grouped_fp8_gemm_nt_masked((a[0][None], a[1][None]), grouped_b, torch.tensor([5], dtype=torch.int32))
