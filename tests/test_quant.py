"""FP8 quantization ops vs dsv3.reference.quant: bitwise equal values and scales, on CPU here and on the GPU through
tests/cuda/test_quant_cuda.py (same tests, `device` fixture overridden)."""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.reference import quant as ref
from dsv3.testing import assert_bitwise_equal, calc_diff

FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _varied(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Random data whose magnitude changes by orders of magnitude from row to row and group to group."""
    magnitude = torch.logspace(-3, 3, cols // 16 + 1).repeat_interleave(16)[:cols]
    x = torch.randn(rows, cols) * magnitude[torch.randperm(cols)]
    return x.to(dtype).to(device)


def _assert_token_quant_matches(x: torch.Tensor, group_size: int = 128, ue8m0: bool = False) -> None:
    q, s = dsv3.per_token_group_quant_fp8(x, group_size=group_size, ue8m0=ue8m0)
    rq, rs = ref.per_token_group_quant_fp8(x.cpu(), group_size=group_size, ue8m0=ue8m0)
    assert q.device == x.device and s.device == x.device
    assert_bitwise_equal(s.cpu(), rs, "scales")
    assert_bitwise_equal(q.cpu(), rq, "q")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("group_size", [128, 64, 32, 8])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_token_quant_matches_reference_bitwise(device, dtype, group_size, ue8m0):
    _assert_token_quant_matches(_varied(37, 512, dtype, device), group_size, ue8m0)


@pytest.mark.parametrize("shape", [(1, 128), (3, 5, 256), (2, 1, 1, 7168), (0, 128), (4, 0)])
def test_token_quant_shapes(device, shape):
    x = torch.randn(shape, dtype=torch.bfloat16, device=device)
    q, s = dsv3.per_token_group_quant_fp8(x)
    assert q.shape == x.shape and q.dtype == torch.float8_e4m3fn
    assert s.shape == (*shape[:-1], shape[-1] // 128) and s.dtype == torch.float32
    _assert_token_quant_matches(x)


def test_token_quant_rounds_every_e4m3_interval(device):
    # With 448 in the group the scale is exactly 1, so q is the e4m3 rounding of x itself: probe every representable
    # value, every midpoint between neighbours (ties go to even) and one fp32 ulp either side of each midpoint.
    codes = torch.arange(0, 127, dtype=torch.uint8)  # 0 .. 448, all non-negative finite e4m3
    values = codes.view(torch.float8_e4m3fn).float()
    mids = (values[:-1] + values[1:]) / 2
    probes = torch.cat([values, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    probes = torch.cat([probes, -probes])
    padded = torch.zeros(-(-probes.numel() // 127) * 127)
    padded[: probes.numel()] = probes
    groups = torch.cat([torch.full((padded.numel() // 127, 1), 448.0), padded.reshape(-1, 127)], dim=1)
    _assert_token_quant_matches(groups.to(device))
    _, s = dsv3.per_token_group_quant_fp8(groups.to(device))
    assert torch.all(s == 1.0)


@pytest.mark.parametrize(
    "fill",
    [0.0, 1e6, -1e6, 1e-40, 3e-5, 1e-4, 448.0, 65504.0, 1e38],
    ids=lambda v: f"{v:g}",
)
def test_token_quant_extreme_values(device, fill):
    x = torch.full((2, 256), fill)
    x[1, 5] = -fill / 3  # a second magnitude in the group, and a negative
    x[1, 200] = fill * 1e-7  # values that underflow to e4m3 subnormals or zero
    _assert_token_quant_matches(x.to(device))
    _assert_token_quant_matches(x.to(device), ue8m0=True)


def test_token_quant_half_precision_subnormals(device):
    x = torch.tensor([2.0**-24, -(2.0**-20), 2.0**-15, 0.0] * 32, dtype=torch.float16).reshape(1, 128)
    _assert_token_quant_matches(x.to(device))


def test_token_quant_non_finite_stays_in_its_group(device):
    x = torch.randn(3, 384)
    x[0, 10] = float("nan")
    x[1, 130] = float("inf")
    x[2, 300] = -float("inf")
    _assert_token_quant_matches(x.to(device))
    _, s = dsv3.per_token_group_quant_fp8(x.to(device))
    s = s.cpu()
    assert torch.isnan(s[0, 0]) and torch.isinf(s[1, 1]) and torch.isinf(s[2, 2])
    finite_groups = torch.isfinite(s)
    assert int(finite_groups.sum()) == 6


def test_token_quant_ue8m0_scales_are_powers_of_two_covering_amax(device):
    x = _varied(16, 1024, torch.float32, device)
    _, s = dsv3.per_token_group_quant_fp8(x, ue8m0=True)
    mantissa, _ = torch.frexp(s.cpu())
    assert torch.all(mantissa == 0.5)
    amax = x.cpu().reshape(16, 8, 128).abs().amax(-1)
    assert torch.all(s.cpu() * 448 >= amax)
    assert torch.all(s.cpu() * 224 < amax.clamp(min=1e-4))


def test_token_quant_error_is_within_fp8_precision(device):
    x = _varied(64, 2048, torch.bfloat16, device)
    q, s = dsv3.per_token_group_quant_fp8(x)
    restored = ref.dequant_per_token_group(q.cpu(), s.cpu())
    assert calc_diff(restored, x.cpu().float()) < 5e-4
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for values in the normal range of their group
    x32 = x.cpu().float()
    normal = x32.abs() >= s.cpu().repeat_interleave(128, -1) * 2**-6
    assert torch.all((restored - x32).abs()[normal] <= x32.abs()[normal] * 2**-4)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(576, 512), (129, 257), (1, 1), (256, 128), (7, 300)])
def test_block_quant_matches_reference_bitwise(device, dtype, shape):
    w = _varied(*shape, dtype, device) if shape[1] >= 16 else torch.randn(shape, dtype=dtype, device=device)
    q, s = dsv3.per_block_quant_fp8(w)
    rq, rs = ref.per_block_quant_fp8(w.cpu())
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert_bitwise_equal(s.cpu(), rs, "scale_inv")
    assert_bitwise_equal(q.cpu(), rq, "q")


def test_block_quant_extremes_stay_in_their_block(device):
    w = torch.randn(300, 260)
    w[:128, :128] = 0.0  # all-zero block
    w[130, 5] = 1e6
    w[5, 200] = float("nan")
    w[299, 259] = 1e-40
    q, s = dsv3.per_block_quant_fp8(w.to(device))
    rq, rs = ref.per_block_quant_fp8(w)
    assert_bitwise_equal(s.cpu(), rs, "scale_inv")
    assert_bitwise_equal(q.cpu(), rq, "q")
    s = s.cpu()
    assert s[0, 0] == torch.tensor(1e-4) / 448 and torch.isnan(s[0, 1]) and s[1, 0] == torch.tensor(1e6) / 448
    assert int(torch.isnan(s).sum()) == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("block", [128, 64])
def test_dequant_matches_reference_bitwise(device, dtype, block):
    w = _varied(300, 520, torch.float32, "cpu")
    rq, rs = ref.per_block_quant_fp8(w, block)
    out = dsv3.dequant_fp8_block(rq.to(device), rs.to(device), dtype=dtype, block=block)
    assert out.dtype == dtype and out.device.type == device.type
    assert_bitwise_equal(out.cpu(), ref.dequant_fp8_block(rq, rs, block, dtype), "out")


def test_dequant_every_code_and_non_finite_scales(device):
    q = torch.arange(256, dtype=torch.uint8).reshape(2, 128).view(torch.float8_e4m3fn)
    for scale in (1.0, 2.0**-20, 3.5, float("inf"), float("nan")):
        scale_inv = torch.full((1, 1), scale)
        out = dsv3.dequant_fp8_block(q.to(device), scale_inv.to(device), dtype=torch.float32)
        assert_bitwise_equal(out.cpu(), ref.dequant_fp8_block(q, scale_inv, dtype=torch.float32), f"scale {scale}")


def test_block_round_trip_error(device):
    w = torch.randn(512, 1024, dtype=torch.bfloat16, device=device)
    q, s = dsv3.per_block_quant_fp8(w)
    restored = dsv3.dequant_fp8_block(q, s, dtype=torch.float32)
    assert calc_diff(restored.cpu(), w.cpu().float()) < 5e-4


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_token_quant_rejects_bad_input(device):
    x = torch.randn(4, 256, dtype=torch.bfloat16, device=device)
    with pytest.raises(TypeError, match="x: expected dtype"):
        dsv3.per_token_group_quant_fp8(x.to(torch.int32))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        dsv3.per_token_group_quant_fp8(x.tolist())
    with pytest.raises(ValueError, match="x: last dimension 256 is not a multiple of group_size=96"):
        dsv3.per_token_group_quant_fp8(x, group_size=96)
    with pytest.raises(ValueError, match="x: expected a contiguous tensor"):
        dsv3.per_token_group_quant_fp8(torch.randn(256, 8, device=device).t())
    misaligned = x.view(-1)[1:129]  # starts 2 bytes past an aligned address
    if device.type == "cuda":
        with pytest.raises(ValueError, match="x: expected a 16-byte aligned"):
            dsv3.per_token_group_quant_fp8(misaligned)
    else:  # the CPU kernels use unaligned loads
        _assert_token_quant_matches(misaligned)
    with pytest.raises(ValueError, match="x: expected at least 1 dimensions"):
        dsv3.per_token_group_quant_fp8(torch.tensor(1.0, device=device))
    for bad in (0, -128):
        with pytest.raises(ValueError, match="group_size: expected a positive int"):
            dsv3.per_token_group_quant_fp8(x, group_size=bad)
    with pytest.raises(TypeError, match="group_size: expected an int"):
        dsv3.per_token_group_quant_fp8(x, group_size=128.0)


def test_block_ops_reject_bad_input(device):
    w = torch.randn(256, 256, device=device)
    with pytest.raises(ValueError, match="w: expected 2 dimensions"):
        dsv3.per_block_quant_fp8(w.reshape(2, 128, 256))
    with pytest.raises(TypeError, match="w: expected dtype"):
        dsv3.per_block_quant_fp8(w.to(torch.float64))
    q, s = dsv3.per_block_quant_fp8(w)
    with pytest.raises(ValueError, match=r"scale_inv: expected shape \[2, 2\], got \[2, 3\]"):
        dsv3.dequant_fp8_block(q, torch.ones(2, 3, device=device))
    with pytest.raises(TypeError, match="scale_inv: expected dtype float32"):
        dsv3.dequant_fp8_block(q, s.double())
    with pytest.raises(TypeError, match="q: expected dtype float8_e4m3fn"):
        dsv3.dequant_fp8_block(q.view(torch.uint8), s)
    with pytest.raises(TypeError, match="dtype: expected"):
        dsv3.dequant_fp8_block(q, s, dtype=torch.int8)
    with pytest.raises(ValueError, match="block: expected a positive int"):
        dsv3.per_block_quant_fp8(w, block=0)


def test_kernel_entry_points_revalidate(device):
    """The raw C++ entry points refuse inconsistent parameters themselves (ValueError, not a crash)."""
    from dsv3.ops.extension import run_kernel

    x = torch.randn(2, 128, device=device)
    q = torch.empty(2, 128, dtype=torch.float8_e4m3fn, device=device)
    s = torch.empty(2, 1, device=device)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        run_kernel("per_token_group_quant_fp8", device, x.data_ptr(), 0, q.data_ptr(), s.data_ptr(), 2, 128, 96, False)
    with pytest.raises(ValueError, match="group_size: expected a positive value"):
        run_kernel("per_token_group_quant_fp8", device, x.data_ptr(), 0, q.data_ptr(), s.data_ptr(), 2, 128, 0, False)
    with pytest.raises(ValueError, match="null pointer"):
        run_kernel("per_token_group_quant_fp8", device, 0, 0, q.data_ptr(), s.data_ptr(), 2, 128, 128, False)
    with pytest.raises(ValueError, match="x: expected float32, bfloat16 or float16"):
        run_kernel("per_token_group_quant_fp8", device, x.data_ptr(), 3, q.data_ptr(), s.data_ptr(), 2, 128, 128, False)


def test_registered_as_torch_custom_ops(device):
    # (opcheck's schema test multiplies outputs, which torch cannot do for float8 on the CPU)
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")
    x = torch.randn(4, 256, dtype=torch.bfloat16, device=device)
    torch.library.opcheck(torch.ops.dsv3.per_token_group_quant_fp8.default, (x, 128, False), test_utils=checks)
    w = torch.randn(130, 256, device=device)
    torch.library.opcheck(torch.ops.dsv3.per_block_quant_fp8.default, (w, 128), test_utils=checks)
    q, s = dsv3.per_block_quant_fp8(w)
    torch.library.opcheck(torch.ops.dsv3.dequant_fp8_block.default, (q, s, 128, torch.bfloat16), test_utils=checks)


def test_traceable_by_torch_compile(device):
    def quantize_and_restore(x):
        q, s = dsv3.per_token_group_quant_fp8(x)
        return q.float() * s.repeat_interleave(128, -1)

    x = torch.randn(8, 256, device=device)
    compiled = torch.compile(quantize_and_restore, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), quantize_and_restore(x))


@pytest.mark.parametrize("shape", [(0, 256), (1, 256), (3, 5, 512), (7, 4096)], ids=str)
def test_silu_and_mul_quant_matches_the_two_reference_steps(device, shape):
    """per_token_group_quant_fp8(silu_and_mul(h)), the reference computed on the same device: bit for bit on the GPU
    (same SiLU formula and expf as torch's kernel); on the CPU, whose vector exp may differ from torch's in the last
    bit, a product can land on the neighbouring bf16 value: codes and scales equal almost everywhere and the
    dequantized values within bf16 rounding."""
    torch.manual_seed(0)
    h = (torch.randn(*shape) * torch.logspace(-2, 1, shape[-1])).to(torch.bfloat16).to(device)
    q, s = dsv3.silu_and_mul_quant_fp8(h)
    rq, rs = ref.silu_and_mul_quant_fp8(h)
    assert q.shape == rq.shape and s.shape == rs.shape and q.device == h.device
    if device.type == "cuda":
        assert_bitwise_equal(s, rs, "scales")
        assert_bitwise_equal(q, rq, "q")
        return
    if not q.numel():
        return
    assert (q.view(torch.uint8) != rq.view(torch.uint8)).float().mean() < 1e-3
    assert torch.allclose(s, rs, rtol=2**-7, atol=0)
    values = ref.dequant_per_token_group(q, s)
    assert calc_diff(values, ref.dequant_per_token_group(rq, rs)) < 1e-5


def test_silu_and_mul_quant_propagates_nan_and_inf_like_the_reference(device):
    h = torch.randn(2, 512).to(torch.bfloat16)
    h[0, 5] = float("nan")  # a NaN gate: NaN product, NaN group scale
    h[1, 256 + 130] = float("inf")  # an infinite up value: an infinite product, an infinite group scale
    h = h.to(device)
    _, s = dsv3.silu_and_mul_quant_fp8(h)
    _, rs = ref.silu_and_mul_quant_fp8(h)
    assert torch.equal(torch.isnan(s), torch.isnan(rs)) and torch.equal(torch.isinf(s), torch.isinf(rs))
    assert torch.isnan(s[0, 0]) and not torch.isfinite(s[1, 1])


def test_silu_and_mul_quant_rejects_bad_input(device):
    with pytest.raises(TypeError, match="h: expected dtype bfloat16"):
        dsv3.silu_and_mul_quant_fp8(torch.zeros(2, 256, device=device))
    with pytest.raises(ValueError, match="h: last dimension 384 must be twice a multiple of 128"):
        dsv3.silu_and_mul_quant_fp8(torch.zeros(2, 384, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="h: expected a contiguous tensor"):
        dsv3.silu_and_mul_quant_fp8(torch.zeros(512, 2, dtype=torch.bfloat16, device=device).t())
