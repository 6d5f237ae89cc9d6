"""fp8_gemm_nt and fp8_linear vs dsv3.reference.gemm, on CPU here and on the GPU through tests/cuda/test_gemm_cuda.py
(same tests, `device` fixture overridden).

Tolerances. The kernel and the reference add the same exact e4m3 products (each is exact in fp32) in a different
order and with the scales applied per 128-wide K group instead of per product; both round once to bf16. Their fp32
sums differ by a few fp32 ulps of sum|a_k * b_k|, so the bf16 results differ by at most one bf16 ulp (<= 2^-7 of the
value: RTOL) plus that fp32 difference, which matters only where cancellation leaves a result much smaller than
sum|a_k * b_k| (ATOL_OF_ABS_SUM times its largest value). Hopper's FP8 tensor cores keep only about 14 bits of the
running sum inside an MMA (the CUDA kernel promotes to fp32 every 128-wide K group, four MMAs), so there that
difference can reach ~4 x 2^-14 of sum|a_k * b_k|: ATOL_OF_ABS_SUM_CUDA.
"""

from __future__ import annotations

import functools

import pytest
import torch

import dsv3
from dsv3.reference import gemm as ref
from dsv3.reference import quant as rq
from dsv3.testing import assert_bitwise_equal, assert_close, calc_diff

# (N, K) of DeepSeek-V3's FP8 projections: kv_a (576), q_a (1536), q_b (128 heads x 192), o_proj (128 heads x 128 in),
# an expert's down (2048 in), fused gate+up (2 x 2048 out) and gate or up alone.
DSV3_SHAPES = [(576, 7168), (1536, 7168), (24576, 1536), (7168, 16384), (7168, 2048), (4096, 7168), (2048, 7168)]
N_SLICE = 704  # rows of the weight tested here (5.5 scale tiles: a partial last tile); tests/cuda runs the full sizes
RTOL = 2**-7
ATOL_OF_ABS_SUM = 2**-17
ATOL_OF_ABS_SUM_CUDA = 2**-12
E4M3_NAN = 0x7F


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference per-token quantization for any K: zero padding to a multiple of 128 leaves every group's amax."""
    m, k = x.shape
    padded = x.new_zeros(m, rq.ceil_div(k, 128) * 128)
    padded[:, :k] = x
    q, s = rq.per_token_group_quant_fp8(padded)
    return q[:, :k].contiguous(), s


@functools.cache
def _weight(n: int, k: int, device_type: str) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The first N_SLICE rows of a weight with DeepSeek-V3-like scale spread, and its reference quantization, on
    `device_type` (cached per shape)."""
    n = min(n, N_SLICE)
    gen = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=gen) * torch.exp2(torch.randint(-10, -2, (n, 1), generator=gen).float())
    qb, sb = rq.per_block_quant_fp8(w)
    return w.to(device_type), (qb.to(device_type), sb.to(device_type))


def _cuda_rejects(device: torch.device, n: int, k: int) -> bool:
    """The CUDA kernels need 16-byte rows (K % 16 == 0) and N % 8 == 0; the wrapper refuses other shapes there."""
    return device.type == "cuda" and (k % 16 != 0 or n % 8 != 0)


def _abs_sum_bound(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """max over outputs of sum_k |a_k * b_k| of the dequantized operands (finite part), the scale of fp32 rounding."""
    da = ref.dequant_activation(*a).nan_to_num(0.0, 0.0, 0.0).abs()
    db = ref.dequant_weight(*b).nan_to_num(0.0, 0.0, 0.0).abs()
    return float((da @ db.T).max()) if da.numel() and db.numel() else 0.0


def _atol_of_abs_sum(device: torch.device) -> float:
    return ATOL_OF_ABS_SUM_CUDA if device.type == "cuda" else ATOL_OF_ABS_SUM


def assert_matches_reference(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Runs the op, checks it against the reference (calc_diff, tolerances, non-finite positions); returns out."""
    result = dsv3.fp8_gemm_nt(a, b, out=out)
    expected = ref.fp8_gemm_nt(a, b)
    assert result.dtype == torch.bfloat16 and result.shape == expected.shape and result.device == a[0].device
    atol = _atol_of_abs_sum(result.device) * _abs_sum_bound(a, b)
    assert_close(result.float(), expected.float(), rtol=RTOL, atol=atol, max_diff=1e-5, name="out")
    return result


@pytest.mark.parametrize("m", [1, 3, 7, 64, 129])
@pytest.mark.parametrize("n,k", DSV3_SHAPES, ids=lambda v: str(v))
def test_deepseek_v3_shapes_match_reference(device, n, k, m):
    w, (qb, sb) = _weight(n, k, device.type)
    x = torch.randn(m, k, device=device)
    a = quantize_activation(x)
    out = assert_matches_reference(a, (qb, sb))
    # FP8 quantization error only: close to the unquantized bf16 product of the original data.
    unquantized = torch.nn.functional.linear(x.bfloat16(), w.bfloat16())
    assert calc_diff(out, unquantized) < 1e-3


@pytest.mark.usefixtures("gemm_kernel")
@pytest.mark.parametrize("m,n,k", [(3, 576, 640), (65, 576, 640), (5, 300, 200), (70, 128, 200), (9, 1, 129)])
def test_partial_k_groups_and_n_tiles(device, m, n, k):
    x, w = torch.randn(m, k, device=device), torch.randn(n, k, device=device)
    a, b = quantize_activation(x), rq.per_block_quant_fp8(w)
    if _cuda_rejects(device, n, k):
        with pytest.raises(ValueError, match="on CUDA, (K must be a multiple of 16|N must be a multiple of 8)"):
            dsv3.fp8_gemm_nt(a, b)
        return
    assert_matches_reference(a, b)


@pytest.mark.usefixtures("cpu_kernel")
def test_large_gemm_equals_its_pieces_bit_for_bit(device):
    """A GEMM big enough for the CPU kernel's widest work units (many weight slices a unit, K groups taken in chunks;
    here two blocks of rows, the second ending in a partial row tile, a partial last unit and slice, and a partial
    last K group) matches the reference, and every output equals, bit for bit, the same output from small GEMMs over a
    few rows of a or of the weight, which run on one-slice units: how the work is cut never changes a value. (CPU
    only: on a GPU the schedules the heuristic picks for different shapes may split K differently.)"""
    if device.type != "cpu":
        pytest.skip("the CPU kernel's work units")
    m, n, k = 274, 3880, 7104
    a = quantize_activation(torch.randn(m, k))
    b = rq.per_block_quant_fp8(torch.randn(n, k) * 0.05)
    out = assert_matches_reference(a, b)
    for rows in (slice(0, 16), slice(240, 274), slice(272, 274)):  # (a single row may take another kernel)
        assert_bitwise_equal(dsv3.fp8_gemm_nt((a[0][rows], a[1][rows]), b), out[rows], name=f"rows {rows}")
    for cols in (slice(0, 704), slice(3584, 3880)):  # multiples of 128: whole weight scale tiles
        weight = (b[0][cols], b[1][cols.start // 128 : rq.ceil_div(cols.stop, 128)])
        assert_bitwise_equal(dsv3.fp8_gemm_nt(a, weight), out[:, cols], name=f"weight rows {cols}")


@pytest.mark.parametrize("n", [576, 8])
def test_empty_m(device, n):
    a = (torch.empty(0, 256, dtype=torch.float8_e4m3fn, device=device), torch.empty(0, 2, device=device))
    b = rq.per_block_quant_fp8(torch.randn(n, 256, device=device))
    out = dsv3.fp8_gemm_nt(a, b)
    assert out.shape == (0, n) and out.dtype == torch.bfloat16


@pytest.mark.usefixtures("gemm_kernel")
@pytest.mark.parametrize("m", [1, 20])
def test_all_zero_blocks_contribute_nothing(device, m):
    x, w = torch.randn(m, 512, device=device), torch.randn(384, 512, device=device)
    x[:, 128:256] = 0  # a zero activation group in every row
    w[128:256, :] = 0  # a zero row of weight tiles: outputs 128..255 are exactly 0
    w[:128, 384:] = 0  # one zero tile
    a, b = quantize_activation(x), rq.per_block_quant_fp8(w)
    assert torch.all(b[1][1] == torch.tensor(1e-4) / 448)  # the amax floor
    out = assert_matches_reference(a, b)
    assert torch.all(out[:, 128:256] == 0)


@pytest.mark.usefixtures("gemm_kernel")
@pytest.mark.parametrize("m", [2, 33])
def test_extreme_codes_and_large_scales(device, m):
    k, n = 1024, 256
    signs_a = torch.randint(0, 2, (m, k), device=device) * 2 - 1
    signs_b = torch.randint(0, 2, (n, k), device=device) * 2 - 1
    qa = (448.0 * signs_a).to(torch.float8_e4m3fn)
    qb = (448.0 * signs_b).to(torch.float8_e4m3fn)
    sa = torch.full((m, k // 128), 2.0**40, device=device)
    sb = torch.full((n // 128, k // 128), 2.0**30, device=device) * torch.arange(1, k // 128 + 1, device=device)
    out = assert_matches_reference((qa, sa), (qb, sb))  # |out| up to ~1e28: finite in fp32 and bf16
    assert torch.isfinite(out).all() and out.float().abs().max() > 1e25
    # Sums past the fp32 range overflow to inf in both, with the sign of the (same-signed) products.
    qa_pos = torch.full((m, k), 448.0, device=device).to(torch.float8_e4m3fn)
    qb_mixed = torch.full((n, k), 448.0, device=device)
    qb_mixed[n // 2 :] *= -1
    big = torch.full((n // 128, k // 128), 2.0**64, device=device)
    out = assert_matches_reference((qa_pos, sa), (qb_mixed.to(torch.float8_e4m3fn), big))
    assert torch.all(out[:, : n // 2] == float("inf")) and torch.all(out[:, n // 2 :] == -float("inf"))


@pytest.mark.usefixtures("gemm_kernel")
@pytest.mark.parametrize("m", [1, 20])
def test_scale_products_beyond_fp32_range(device, m):
    """sa * sb overflows fp32 while every dequantized value is finite: a group of zero codes still adds exactly 0
    (the reference scales each product; a kernel that multiplied its zero sum by sa * sb = inf would give NaN)."""
    if device.type == "cuda":
        pytest.skip("the sm_90a kernel scales group sums by sa * sb (inf * 0 = NaN); quantizers never make such scales")
    k, n = 384, 256
    qa = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
    qa[:, 128:256] = 0
    qb = torch.randn(n, k, device=device).to(torch.float8_e4m3fn)
    sa = torch.tensor([2.0**-60, 2.0**70, 2.0**-60], device=device).expand(m, 3).contiguous()
    sb = torch.full((2, 3), 2.0**70, device=device)
    out = assert_matches_reference((qa, sa), (qb, sb))
    assert torch.isfinite(out).all()


@pytest.mark.usefixtures("gemm_kernel")
@pytest.mark.parametrize("m", [3, 40])
def test_nan_and_inf_propagate_like_the_reference(device, m):
    k, n = 768, 384
    x, w = torch.randn(m, k), torch.randn(n, k)
    x[m - 1, 300] = float("nan")  # NaN scale for group 2 of the last row: that whole output row is NaN
    w[200, 700] = float("inf")  # inf scale + NaN code in tile (1, 5): output columns 128..255 are NaN
    a, b = quantize_activation(x.to(device)), rq.per_block_quant_fp8(w.to(device))
    qa = a[0].view(torch.uint8).clone()
    qa[0, 5] = E4M3_NAN  # a NaN code with a finite scale: only output row 0
    qb = b[0].view(torch.uint8).clone()
    qb[300, k - 1] = E4M3_NAN | 0x80  # negative NaN code: only output column 300
    a, b = (qa.view(torch.float8_e4m3fn), a[1]), (qb.view(torch.float8_e4m3fn), b[1])
    out = assert_matches_reference(a, b).cpu()
    nan = torch.isnan(out)
    assert nan[0].all() and nan[m - 1].all() and nan[:, 128:256].all() and nan[:, 300].all()
    assert int(nan.sum()) == n * 2 + (m - 2) * 129  # NaN nowhere else


def test_fp8_linear_matches_reference(device):
    x = torch.randn(2, 3, 1024, dtype=torch.bfloat16, device=device)
    w = torch.randn(576, 1024, device=device) * 0.02
    weight = rq.per_block_quant_fp8(w)
    y = dsv3.fp8_linear(x, weight)
    assert y.shape == (2, 3, 576) and y.dtype == torch.bfloat16
    a = rq.per_token_group_quant_fp8(x.reshape(6, 1024))
    expected = ref.fp8_gemm_nt(a, weight).reshape(2, 3, 576)
    atol = _atol_of_abs_sum(y.device) * _abs_sum_bound(a, weight)
    assert_close(y.float(), expected.float(), rtol=RTOL, atol=atol, max_diff=1e-5, name="y")
    assert calc_diff(y, torch.nn.functional.linear(x, w.bfloat16())) < 1e-3


@pytest.mark.parametrize(
    ("m", "n", "k"), [(1, 576, 7168), (5, 256, 128), (33, 2112, 512), (130, 384, 1536), (0, 256, 256)]
)
def test_fp8_linear_is_quantization_then_gemm(device, gemm_kernel, m, n, k):
    """The fused op equals its two halves bit for bit: per_token_group_quant_fp8, then fp8_gemm_nt."""
    x = torch.randn(m, k, dtype=torch.bfloat16, device=device) * 3
    if m:
        x[0, :128] = 0  # an all-zero group takes the minimum scale
    if m > 1:
        x[m - 1, k - 1] = float("nan")  # a NaN group: NaN scale, its row's outputs NaN
    weight = rq.per_block_quant_fp8(torch.randn(n, k, device=device) * 0.05)
    y = dsv3.fp8_linear(x, weight)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert_bitwise_equal(y, dsv3.fp8_gemm_nt(dsv3.per_token_group_quant_fp8(x, 128), weight), name="y")


def test_fp8_linear_takes_strided_views(device):
    x = torch.randn(6, 2 * 256, dtype=torch.bfloat16, device=device)[:, :256]  # rows 512 values apart
    weight = rq.per_block_quant_fp8(torch.randn(128, 256, device=device))
    assert_bitwise_equal(dsv3.fp8_linear(x, weight), dsv3.fp8_linear(x.contiguous(), weight), name="y")


@pytest.mark.usefixtures("gemm_kernel")
@pytest.mark.parametrize("m", [1, 16])
def test_every_weight_code_decodes_exactly(device, m):
    """Weight row j holds code j (all 256: zeros, subnormals, normals, NaN) where a is 1 and ordinary codes where a is
    0, so out[:, j] is code j's value, exact in bf16. Rows of ordinary codes and rows holding a zero, subnormal or NaN
    code are decoded along different paths on the CPU; both must give every value."""
    n, k = 256, 256
    qa = torch.zeros(m, k, dtype=torch.float8_e4m3fn)
    qa[:, 0] = 1.0
    filler = torch.tensor([1.5, -3.0, 0.375, 240.0]).repeat(n, k // 4)  # normal codes, times a's zeros
    qb = filler.to(torch.float8_e4m3fn)
    qb[:, 0] = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    sa, sb = torch.ones(m, 2), torch.ones(2, 2)
    out = dsv3.fp8_gemm_nt((qa.to(device), sa.to(device)), (qb.to(device), sb.to(device))).cpu()
    expected = (qb[:, 0].float() + 0.0).to(torch.bfloat16).expand(m, n)  # a sum from +0: code 0x80 gives +0
    assert_bitwise_equal(out, ref.fp8_gemm_nt((qa, sa), (qb, sb)), name="out")
    assert_bitwise_equal(out, expected.contiguous(), name="out vs the codes' values")


@pytest.mark.usefixtures("gemm_kernel")
@pytest.mark.parametrize("m", [1, 3, 16, 40])
def test_output_rounding_is_exact(device, m):
    """One nonzero product per output, so its fp32 value is exact and only the rounding to bf16 is tested: ties to
    even, bf16 subnormals kept (not flushed), NaN scales giving NaN rows."""
    n, k = 40, 256
    qa = torch.zeros(m, k, dtype=torch.float8_e4m3fn)
    qa[:, 0] = 1.0
    qb = torch.zeros(n, k, dtype=torch.float8_e4m3fn)
    qb[:, 0] = torch.tensor([1.0, 1.125, -1.25, 1.5] * (n // 4))
    ties = 1 + torch.arange(m, dtype=torch.float64) / 128 + 1 / 256  # exactly half a bf16 step above 1 + i/128
    sa = ties.float()[:, None].repeat(1, 2)
    sa[m // 2] = 2.0**-130 * (1 + 2.0**-8)  # products in the bf16 subnormal range
    if m > 2:
        sa[1] = float("nan")
    sb = torch.ones(1, 2)
    out = dsv3.fp8_gemm_nt((qa.to(device), sa.to(device)), (qb.to(device), sb.to(device))).cpu()
    assert_bitwise_equal(out, ref.fp8_gemm_nt((qa, sa), (qb, sb)), name="out")
    assert (out[m // 2] != 0).all()  # subnormals survive


def test_out_is_written_in_place(device):
    a = quantize_activation(torch.randn(9, 512, device=device))
    b = rq.per_block_quant_fp8(torch.randn(256, 512, device=device))
    out = torch.full((9, 256), float("nan"), dtype=torch.bfloat16, device=device)
    result = assert_matches_reference(a, b, out=out)
    assert result is out and not torch.isnan(out).any()


# ---- bad input ----------------------------------------------------------------------------------------------------


def _operands(device: torch.device, m: int = 4, n: int = 256, k: int = 256):
    a = quantize_activation(torch.randn(m, k, device=device))
    b = rq.per_block_quant_fp8(torch.randn(n, k, device=device))
    return a, b


def test_rejects_bad_input(device):
    (qa, sa), (qb, sb) = _operands(device)
    gemm = dsv3.fp8_gemm_nt
    with pytest.raises(TypeError, match="a: expected a \\(values, scales\\) pair"):
        gemm(qa, (qb, sb))
    with pytest.raises(TypeError, match="b: expected a \\(values, scales\\) pair"):
        gemm((qa, sa), (qb, sb, sb))
    with pytest.raises(TypeError, match="a: expected dtype float8_e4m3fn, got bfloat16"):
        gemm((qa.bfloat16(), sa), (qb, sb))
    with pytest.raises(TypeError, match="b: expected dtype float8_e4m3fn, got uint8"):
        gemm((qa, sa), (qb.view(torch.uint8), sb))
    with pytest.raises(TypeError, match="a scales: expected dtype float32, got float64"):
        gemm((qa, sa.double()), (qb, sb))
    with pytest.raises(TypeError, match="b scales: expected a torch.Tensor"):
        gemm((qa, sa), (qb, sb.tolist()))
    with pytest.raises(ValueError, match="a: expected 2 dimensions"):
        gemm((qa.reshape(2, 2, 256), sa), (qb, sb))
    with pytest.raises(ValueError, match=r"b: expected shape \[\*, 256\], got \[256, 128\]"):
        gemm((qa, sa), (qb[:, :128].contiguous(), sb[:, :1].contiguous()))
    with pytest.raises(ValueError, match=r"a scales: expected shape \[4, 2\], got \[4, 1\]"):
        gemm((qa, sa[:, :1].contiguous()), (qb, sb))
    with pytest.raises(ValueError, match=r"b scales: expected shape \[2, 2\], got \[2, 3\]"):
        gemm((qa, sa), (qb, torch.ones(2, 3, device=device)))
    with pytest.raises(ValueError, match="a: expected a contiguous tensor"):
        gemm((qa.t().contiguous().t(), sa), (qb, sb))
    with pytest.raises(ValueError, match="b scales: expected a contiguous tensor"):
        gemm((qa, sa), (qb, sb.t().contiguous().t()))


def test_rejects_misaligned_and_bad_out(device):
    (qa, sa), (qb, sb) = _operands(device)
    storage = torch.empty(qa.numel() + 1, dtype=torch.float8_e4m3fn, device=device)
    shifted = storage[1:].view(qa.shape)
    shifted.copy_(qa)
    if device.type == "cuda":  # TMA needs 16-byte aligned operands
        with pytest.raises(ValueError, match="a: expected a 16-byte aligned data pointer"):
            dsv3.fp8_gemm_nt((shifted, sa), (qb, sb))
    else:  # the CPU kernel uses unaligned loads
        assert torch.equal(dsv3.fp8_gemm_nt((shifted, sa), (qb, sb)), dsv3.fp8_gemm_nt((qa, sa), (qb, sb)))
    with pytest.raises(TypeError, match="out: expected dtype bfloat16, got float32"):
        dsv3.fp8_gemm_nt((qa, sa), (qb, sb), out=torch.empty(4, 256, device=device))
    with pytest.raises(ValueError, match=r"out: expected shape \[4, 256\], got \[256, 4\]"):
        dsv3.fp8_gemm_nt((qa, sa), (qb, sb), out=torch.empty(256, 4, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="out: expected a contiguous tensor"):
        out = torch.empty(256, 4, dtype=torch.bfloat16, device=device).t()
        dsv3.fp8_gemm_nt((qa, sa), (qb, sb), out=out)
    with pytest.raises(TypeError, match="x: expected dtype bfloat16, got float32"):
        dsv3.fp8_linear(torch.randn(2, 256, device=device), (qb, sb))
    with pytest.raises(ValueError, match="x: the input width must be a multiple of 128, got 200"):
        dsv3.fp8_linear(torch.randn(2, 200, dtype=torch.bfloat16, device=device), (qb, sb))
    with pytest.raises(TypeError, match="weight: expected a \\(values, scales\\) pair"):
        dsv3.fp8_linear(torch.randn(2, 256, dtype=torch.bfloat16, device=device), qb)
    with pytest.raises(ValueError, match=r"weight: expected shape \[\*, 384\], got \[256, 256\]"):
        dsv3.fp8_linear(torch.randn(2, 384, dtype=torch.bfloat16, device=device), (qb, sb))
    with pytest.raises(ValueError, match=r"weight scales: expected shape \[2, 2\], got \[2, 1\]"):
        dsv3.fp8_linear(torch.randn(2, 256, dtype=torch.bfloat16, device=device), (qb, sb[:, :1].contiguous()))


def test_kernel_entry_point_revalidates(device):
    """The raw C++ entry point refuses inconsistent parameters itself (ValueError, not a crash)."""
    from dsv3.ops.extension import num_sms, run_kernel

    (qa, sa), (qb, sb) = _operands(device)
    out = torch.empty(4, 256, dtype=torch.bfloat16, device=device)
    extra = (0, num_sms(out.device.index or 0)) if device.type == "cuda" else ()
    pointers = [t.data_ptr() for t in (qa, sa, qb, sb, out)]
    with pytest.raises(ValueError, match="negative GEMM shape"):
        run_kernel("fp8_gemm_nt", device, *pointers, -1, 256, 256, *extra)
    with pytest.raises(ValueError, match="null pointer"):
        run_kernel("fp8_gemm_nt", device, 0, *pointers[1:], 4, 256, 256, *extra)


def test_fused_linear_entry_point_revalidates(device):
    from dsv3.ops.extension import DTYPE_CODES, run_kernel

    x = torch.randn(4, 256, dtype=torch.bfloat16, device=device)
    qb, sb = rq.per_block_quant_fp8(torch.randn(256, 256, device=device))
    out = torch.empty(4, 256, dtype=torch.bfloat16, device=device)
    workspace = torch.empty(1 << 20, dtype=torch.uint8, device=device)
    extra = (workspace.data_ptr(), 132) if device.type == "cuda" else ()
    pointers = (x.data_ptr(), DTYPE_CODES[x.dtype], qb.data_ptr(), sb.data_ptr(), out.data_ptr())
    with pytest.raises(ValueError, match="the input width must be a multiple of 128, got 200"):
        run_kernel("fp8_linear", device, *pointers, 4, 256, 200, *extra)
    with pytest.raises(ValueError, match="x: expected bfloat16, float16 or float32"):
        run_kernel(
            "fp8_linear", device, *pointers[:1], DTYPE_CODES[torch.float8_e4m3fn], *pointers[2:], 4, 256, 256, *extra
        )


def test_registered_as_torch_custom_op(device):
    (qa, sa), (qb, sb) = _operands(device)
    out = torch.empty(4, 256, dtype=torch.bfloat16, device=device)
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.dsv3.fp8_gemm_nt.default, (qa, sa, qb, sb, out), test_utils=checks)
    x = torch.randn(4, 256, dtype=torch.bfloat16, device=device)
    torch.library.opcheck(torch.ops.dsv3.fp8_linear.default, (x, qb, sb, out), test_utils=checks)


def test_fp8_linear_traceable_by_torch_compile(device):
    weight = rq.per_block_quant_fp8(torch.randn(256, 512, device=device))
    x = torch.randn(3, 512, dtype=torch.bfloat16, device=device)
    compiled = torch.compile(lambda x: dsv3.fp8_linear(x, weight), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), dsv3.fp8_linear(x, weight), rtol=0, atol=0)
