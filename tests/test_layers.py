"""rms_norm, fused_add_rms_norm and apply_rope vs dsv3.reference.layers, on CPU here and on the GPU through
tests/cuda/test_layers_cuda.py."""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.reference import layers as ref
from dsv3.testing import assert_bitwise_equal

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _assert_norm_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """The sum of squares may be added in another order than torch's: in a 16-bit dtype that can move the normalized
    value by one rounding (at most 2 eps relative once times the weight and rounded again) and only rarely; in fp32
    the order shows as a few eps of relative error."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    a, e = actual.cpu().double(), expected.double()
    if not e.numel():
        return
    eps = torch.finfo(expected.dtype).eps
    bound = (8 if expected.dtype == torch.float32 else 2) * eps * e.abs() + torch.finfo(expected.dtype).tiny
    worst = float(((a - e).abs() / bound).max())
    assert worst <= 1.0, f"{name}: error {worst:.2f} x the bound"
    differing = float((a != e).double().mean())
    limit = 1.0 if expected.dtype == torch.float32 else 0.02
    assert differing <= limit, f"{name}: {differing:.1%} of the elements differ from the reference"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7168), (16, 512), (3, 5, 1536), (7, 100), (0, 64)])
def test_rms_norm_matches_reference(device, dtype, shape):
    x = (torch.randn(shape) * 4).to(dtype).to(device)
    weight = (torch.rand(shape[-1]) + 0.5).to(dtype).to(device)
    out = dsv3.rms_norm(x, weight, 1e-6)
    _assert_norm_close(out, ref.rms_norm(x.cpu(), weight.cpu(), 1e-6), "out")


def test_rms_norm_zero_row_and_eps(device):
    x = torch.zeros(2, 256, dtype=torch.bfloat16, device=device)
    x[1] = 1e-3
    weight = torch.ones(256, dtype=torch.bfloat16, device=device)
    for eps in (0.0, 1e-6, 1.0):
        out = dsv3.rms_norm(x, weight, eps)
        expected = ref.rms_norm(x.cpu(), weight.cpu(), eps)
        assert_bitwise_equal(out.cpu()[0], expected[0], name="zero row")  # 0 * rsqrt(eps): 0, or NaN for eps = 0
        _assert_norm_close(out[1:], expected[1:], "row 1")


def test_rms_norm_propagates_nan_and_inf(device):
    x = torch.randn(3, 128, device=device)
    x[0, 5], x[1, 7] = float("nan"), float("inf")
    out = dsv3.rms_norm(x, torch.ones(128, device=device)).cpu()
    assert torch.isnan(out[0]).all()  # NaN in the sum of squares
    assert torch.isnan(out[1, 7]) and (out[1, :7] == 0).all() and (out[1, 8:] == 0).all()  # x * rsqrt(inf)
    _assert_norm_close(out[2:], ref.rms_norm(x[2:].cpu(), torch.ones(128)), "finite row")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(device, dtype):
    x = torch.randn(9, 7168).to(dtype).to(device)
    residual = (torch.randn(9, 7168) * 10).to(dtype).to(device)
    weight = torch.rand(7168).to(dtype).to(device)
    out, new_residual = dsv3.fused_add_rms_norm(x, residual, weight, 1e-6)
    r_out, r_residual = ref.fused_add_rms_norm(x.cpu(), residual.cpu(), weight.cpu(), 1e-6)
    assert_bitwise_equal(new_residual.cpu(), r_residual, name="residual")
    _assert_norm_close(out, r_out, "out")


def _cos_sin(positions: int = 300, dim: int = 64) -> torch.Tensor:
    return ref.yarn_cos_sin_cache(positions, dim, 10000.0, factor=40.0, original_max_position_embeddings=64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rope_is_bit_exact(device, dtype):
    cos_sin = _cos_sin().to(device)
    positions = torch.randint(0, 300, (11,), device=device)
    for x in (torch.randn(11, 64), torch.randn(11, 16, 64), torch.randn(11, 4, 192)[..., 128:]):
        x = (x * 3).to(dtype).to(device)
        out = dsv3.apply_rope(x, positions, cos_sin)
        assert out.shape == x.shape and out.is_contiguous()
        assert_bitwise_equal(out.cpu(), ref.apply_rope(x.cpu(), positions.cpu(), cos_sin.cpu()), name="rope")


def test_apply_rope_rejects_bad_input(device):
    cos_sin = _cos_sin().to(device)
    x = torch.randn(4, 64, device=device)
    positions = torch.arange(4, device=device)
    with pytest.raises(TypeError, match="positions: expected dtype int64, got int32"):
        dsv3.apply_rope(x, positions.int(), cos_sin)
    with pytest.raises(ValueError, match=r"cos_sin: expected shape \[\*, 64\]"):
        dsv3.apply_rope(x, positions, cos_sin[:, :32].contiguous())
    with pytest.raises(ValueError, match="x: expected \\[T, d\\] or \\[T, heads, d\\]"):
        dsv3.apply_rope(torch.randn(4, 63, device=device), positions, cos_sin)
    with pytest.raises(ValueError, match="x: expected \\[T, d\\] or \\[T, heads, d\\]"):
        dsv3.apply_rope(torch.randn(64, 4, device=device).t(), positions, cos_sin)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="positions\\[2\\]=300: expected 0..299"):
            dsv3.apply_rope(x, torch.tensor([0, 1, 300, 2]), cos_sin)
    else:  # never read out of bounds; the token's row is NaN
        out = dsv3.apply_rope(x, torch.tensor([0, 1, 300, -1], device=device), cos_sin)
        assert torch.isnan(out[2:]).all() and torch.isfinite(out[:2]).all()


def test_norm_rejects_bad_input(device):
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=device)
    weight = torch.ones(64, dtype=torch.bfloat16, device=device)
    with pytest.raises(TypeError, match="weight: expected dtype bfloat16, got float32"):
        dsv3.rms_norm(x, weight.float())
    with pytest.raises(ValueError, match=r"weight: expected shape \[64\], got \[32\]"):
        dsv3.rms_norm(x, weight[:32])
    with pytest.raises(ValueError, match="eps: expected a non-negative number"):
        dsv3.rms_norm(x, weight, -1.0)
    with pytest.raises(ValueError, match="x: expected a contiguous tensor"):
        dsv3.rms_norm(x.t(), torch.ones(4, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match=r"residual: expected shape \[4, 64\]"):
        dsv3.fused_add_rms_norm(x, x[:2], weight)


def test_registered_as_torch_custom_ops(device):
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=device)
    weight = torch.ones(64, dtype=torch.bfloat16, device=device)
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.dsv3.rms_norm.default, (x, weight, torch.empty_like(x), 1e-6), test_utils=checks)
    rope_args = (
        x.view(4, 1, 64),
        torch.arange(4, device=device),
        _cos_sin().to(device),
        torch.empty(4, 1, 64, dtype=x.dtype, device=device),
    )
    torch.library.opcheck(torch.ops.dsv3.apply_rope.default, rope_args, test_utils=checks)
