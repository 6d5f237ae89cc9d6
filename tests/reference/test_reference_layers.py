"""dsv3.reference.layers: norms and activation vs float64 formulas; YaRN RoPE vs independent and complex forms."""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.reference import (
    apply_rope,
    deinterleave_rope_dims,
    fused_add_rms_norm,
    interleave_rope_dims,
    rms_norm,
    silu_and_mul,
    yarn_correction_range,
    yarn_cos_sin_cache,
    yarn_inv_freq,
    yarn_mscale,
    yarn_softmax_scale,
)
from dsv3.testing import assert_bitwise_equal, assert_close

# ---------------------------------------------------------------------------------------------------------------------
# Norms and activation
# ---------------------------------------------------------------------------------------------------------------------


def rms_norm_f64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return weight.double() * x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)


def test_rms_norm_fp32_matches_float64_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7168, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1.0])[:, None]
    weight = torch.rand(7168, generator=gen) + 0.5
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32
    assert_close(out, rms_norm_f64(x, weight, 1e-6), rtol=1e-5, atol=1e-6, name="fp32")


def test_rms_norm_bf16_rounds_normalized_value_then_multiplies():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 512, generator=gen).to(torch.bfloat16)
    weight = (torch.rand(512, generator=gen) + 0.5).to(torch.bfloat16)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.bfloat16
    # Two bf16 roundings (normalized value, then product) on top of fp32 arithmetic.
    assert_close(out, rms_norm_f64(x, weight, 1e-6), rtol=2**-7, name="bf16 vs float64")
    # The rounding points: the product of two bf16 values is exact in fp32, so only the final rounding remains.
    normalized = rms_norm(x, torch.ones(512, dtype=torch.bfloat16), 1e-6)
    assert_bitwise_equal(out, (weight.float() * normalized.float()).to(torch.bfloat16), name="bf16 structure")
    # eps keeps an all-zero row finite.
    assert bool((rms_norm(torch.zeros(2, 512, dtype=torch.bfloat16), weight, 1e-6) == 0).all())


def test_fused_add_rms_norm():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 1024, generator=gen).to(torch.bfloat16)
    residual = (torch.randn(6, 1024, generator=gen) * 10).to(torch.bfloat16)
    weight = torch.rand(1024, generator=gen).to(torch.bfloat16)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
    assert_bitwise_equal(new_residual, x + residual, name="residual")  # torch's bf16 add: fp32 sum rounded once
    expected_sum = (x.double() + residual.double()).to(torch.bfloat16)
    assert_bitwise_equal(new_residual, expected_sum, name="residual vs exact sum")
    assert_bitwise_equal(normed, rms_norm(new_residual, weight, 1e-6), name="normed")
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, residual.float(), weight)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
def test_silu_and_mul_matches_float64(dtype, rtol):
    x = (torch.randn(9, 2 * 2048, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
    out = silu_and_mul(x)
    assert out.dtype == dtype and out.shape == (9, 2048)
    gate, up = x[:, :2048].double(), x[:, 2048:].double()
    assert_close(out, gate / (1 + torch.exp(-gate)) * up, rtol=rtol, atol=1e-30, name="silu_and_mul")


# ---------------------------------------------------------------------------------------------------------------------
# YaRN RoPE
# ---------------------------------------------------------------------------------------------------------------------


def yarn_inv_freq_f64(dim=64, base=10000.0, factor=40.0, original=4096, beta_fast=32, beta_slow=1) -> torch.Tensor:
    """YaRN frequencies in float64, written the way the paper describes them: blend by rotations per context."""

    def index_for_rotations(rotations):  # frequency index i with original / (2*pi*base^(2i/dim)) == rotations
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(index_for_rotations(beta_fast)), 0)
    high = min(math.ceil(index_for_rotations(beta_slow)), dim - 1)
    freqs = []
    for i in range(dim // 2):
        plain = base ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        freqs.append(plain * (1 - ramp) + plain / factor * ramp)
    return torch.tensor(freqs, dtype=torch.float64)


def test_yarn_frequencies_for_deepseek_v3():
    assert yarn_correction_range() == (10, 23)
    inv_freq = yarn_inv_freq()
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (32,)
    assert_close(inv_freq, yarn_inv_freq_f64(), rtol=1e-6, name="inv_freq")
    plain = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert_close(inv_freq[:11], plain[:11], rtol=1e-6, name="extrapolated (fast) dims")
    assert_close(inv_freq[23:], plain[23:] / 40, rtol=1e-6, name="interpolated (slow) dims")
    assert_close(yarn_inv_freq(factor=1.0), plain, rtol=1e-6, name="factor 1 is plain RoPE")


@pytest.mark.parametrize("mscale,mscale_all_dim", [(1.0, 1.0), (1.0, 0.5), (0.707, 0.0)])
def test_cos_sin_cache(mscale, mscale_all_dim):
    positions = 8192
    cache = yarn_cos_sin_cache(positions, mscale=mscale, mscale_all_dim=mscale_all_dim)
    assert cache.dtype == torch.float32 and cache.shape == (positions, 64)
    magnitude = (0.1 * mscale * math.log(40) + 1) / (0.1 * mscale_all_dim * math.log(40) + 1)
    assert yarn_mscale(40.0, mscale) / yarn_mscale(40.0, mscale_all_dim) == pytest.approx(magnitude, rel=1e-15)
    # Against float64 trigonometry of the exact angle: the fp32 angle rounding (half an ulp of p * f) bounds the error.
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * yarn_inv_freq().double()[None, :]
    bound = magnitude * (angles * 2**-24 + 1e-6)
    assert bool(((cache[:, :32] - magnitude * torch.cos(angles)).abs() <= bound).all())
    assert bool(((cache[:, 32:] - magnitude * torch.sin(angles)).abs() <= bound).all())


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 2**-8, 1e-6)])
def test_apply_rope_equals_complex_rotation(dtype, rtol, atol):
    gen = torch.Generator().manual_seed(4)
    cos_sin = yarn_cos_sin_cache(4096)
    positions = torch.randint(0, 4096, (11,), generator=gen)
    x = torch.randn(11, 16, 64, generator=gen).to(dtype)  # [tokens, heads, rope dims]
    out = apply_rope(x, positions, cos_sin)
    assert out.dtype == dtype and out.shape == x.shape

    pairs = torch.view_as_complex(x.double().reshape(11, 16, 32, 2))
    table = cos_sin[positions].double()
    rotation = torch.complex(table[:, :32], table[:, 32:])[:, None, :]
    expected = torch.view_as_real(pairs * rotation).reshape(11, 16, 64)
    assert_close(out, expected, rtol=rtol, atol=atol, name="rope")
    # 2-D input [tokens, 64] (the shared k_pe) works the same.
    assert_bitwise_equal(apply_rope(x[:, 0], positions, cos_sin), out[:, 0], name="2-D input")


def test_rotate_half_form_is_a_permutation_of_the_interleaved_form():
    gen = torch.Generator().manual_seed(5)
    cos_sin = yarn_cos_sin_cache(2048)
    q, k = torch.randn(2, 7, 64, generator=gen).unbind(0)
    q_pos, k_pos = torch.randint(0, 2048, (7,), generator=gen), torch.randint(0, 2048, (7,), generator=gen)

    def rotate_half_rope(x, positions):  # Hugging Face's form with cos/sin repeated over both halves
        cos = cos_sin[positions, :32].repeat(1, 2)
        sin = cos_sin[positions, 32:].repeat(1, 2)
        rotated = torch.cat([-x[..., 32:], x[..., :32]], dim=-1)
        return x * cos + rotated * sin

    q_half = rotate_half_rope(deinterleave_rope_dims(q), q_pos)
    k_half = rotate_half_rope(deinterleave_rope_dims(k), k_pos)
    q_pairs, k_pairs = apply_rope(q, q_pos, cos_sin), apply_rope(k, k_pos, cos_sin)
    assert_bitwise_equal(q_half, deinterleave_rope_dims(q_pairs), name="same rotation, other order")
    dots_half = (q_half.double()[:, None] * k_half.double()[None]).sum(-1)
    dots_pairs = (q_pairs.double()[:, None] * k_pairs.double()[None]).sum(-1)
    assert_close(dots_half, dots_pairs, rtol=1e-12, atol=1e-12, name="q.k")
    assert_bitwise_equal(interleave_rope_dims(deinterleave_rope_dims(q)), q, name="interleave inverts")
    assert deinterleave_rope_dims(torch.arange(8)).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_yarn_softmax_scale():
    assert yarn_softmax_scale() == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-15)
    assert yarn_softmax_scale() == pytest.approx(0.13523377886, rel=1e-9)
    assert yarn_softmax_scale(factor=1.0) == 192**-0.5
    assert yarn_softmax_scale(mscale_all_dim=0.0) == 192**-0.5
    assert yarn_softmax_scale(576, 40.0, 0.707) == pytest.approx(576**-0.5 * (0.0707 * math.log(40) + 1) ** 2)
