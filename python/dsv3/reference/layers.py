"""Elementwise and normalization layers, and DeepSeek YaRN rotary embeddings: the specification of their kernels.

Defaults are DeepSeek-V3's config: rope_theta 10000, qk_rope_head_dim 64, rope_scaling {type: yarn, factor: 40,
original_max_position_embeddings: 4096, beta_fast: 32, beta_slow: 1, mscale: 1.0, mscale_all_dim: 1.0}.

RoPE pairs are interleaved: rotary frequency i turns the pair (x[2i], x[2i+1]), the form of the official DeepSeek-V3
inference code, for which the checkpoint's q_b_proj / kv_a_proj rows are laid out. Hugging Face transformers rotates
"halves" instead, pairing x[i] with x[i + 32]; it handles the checkpoint by first applying ``deinterleave_rope_dims``
to q and k, a fixed permutation of the 64 rope dims. Permuting q and k alike leaves every q·k unchanged, so the two
forms give the same attention.
"""

from __future__ import annotations

import math

import torch


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ---------------------------------------------------------------------------------------------------------------------
# Normalization and activation
# ---------------------------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hugging Face DeepseekV3RMSNorm: ``weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)``.

    x: [..., H] any float dtype; weight: [H]. The mean of squares and the normalization are computed in fp32, the
    normalized value is rounded to x's dtype, then multiplied by weight in the promoted dtype of (weight, x) — bf16 for
    the model, i.e. one more rounding of the exact product.
    """
    _check(weight.shape == x.shape[-1:], f"weight: expected [{x.shape[-1]}], got {tuple(weight.shape)}")
    xf = x.float()
    variance = xf.pow(2).mean(dim=-1, keepdim=True)
    normalized = xf * torch.rsqrt(variance + eps)
    return weight * normalized.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: returns ``(rms_norm(new_residual, weight, eps), new_residual)``.

    x, residual: [..., H] of the same dtype. new_residual = x + residual added in fp32 and rounded once to that dtype
    (for bf16 this equals torch's bf16 addition, as in the Hugging Face decoder layer); the norm reads the rounded sum.
    """
    _check(x.shape == residual.shape, f"residual: expected {tuple(x.shape)}, got {tuple(residual.shape)}")
    _check(x.dtype == residual.dtype, f"residual: expected dtype {x.dtype}, got {residual.dtype}")
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(new_residual, weight, eps), new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] -> [..., d] = silu(x[..., :d]) * x[..., d:] in fp32, rounded once to x's dtype.

    silu(g) = g * sigmoid(g). The gate half comes first, as in a fused [gate; up] projection.
    """
    _check(x.shape[-1] % 2 == 0, f"x: last dim must be even, got {x.shape[-1]}")
    d = x.shape[-1] // 2
    gate, up = x[..., :d].float(), x[..., d:].float()
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# YaRN rotary embedding
# ---------------------------------------------------------------------------------------------------------------------


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction: 0.1 * mscale * ln(factor) + 1 for factor > 1, else 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(num_rotations: float, rotary_dim: int, base: float, original_max_positions: int) -> float:
    """Frequency index whose wavelength fits num_rotations times into the original context."""
    return rotary_dim * math.log(original_max_positions / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(
    rotary_dim: int = 64,
    base: float = 10000.0,
    original_max_position_embeddings: int = 4096,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> tuple[int, int]:
    """(low, high) frequency indices of the YaRN ramp: ``floor(dim(beta_fast))`` and ``ceil(dim(beta_slow))``, clamped
    to [0, rotary_dim - 1]. For DeepSeek-V3 they are (10, 23)."""
    low = math.floor(_correction_dim(beta_fast, rotary_dim, base, original_max_position_embeddings))
    high = math.ceil(_correction_dim(beta_slow, rotary_dim, base, original_max_position_embeddings))
    return max(low, 0), min(high, rotary_dim - 1)


def yarn_inv_freq(
    rotary_dim: int = 64,
    base: float = 10000.0,
    factor: float = 40.0,
    original_max_position_embeddings: int = 4096,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """YaRN inverse frequencies, fp32 [rotary_dim // 2].

    With f_i = 1 / base^(2i / rotary_dim) (fp32 pow) and ramp_i = clamp((i - low) / (high - low), 0, 1) for
    (low, high) = ``yarn_correction_range`` (high nudged by 0.001 when equal to low):
      inv_freq_i = f_i / factor * ramp_i + f_i * (1 - ramp_i)
    i.e. fast-rotating dims (i <= low) keep their frequency and slow ones (i >= high) are interpolated by ``factor``.
    Evaluated in fp32 as ``1/(factor*p_i) * ramp_i + 1/p_i * (1 - ramp_i)`` with p_i = base^(2i/dim), like transformers.
    """
    _check(rotary_dim % 2 == 0, f"rotary_dim must be even, got {rotary_dim}")
    low, high = yarn_correction_range(rotary_dim, base, original_max_position_embeddings, beta_fast, beta_slow)
    high_f = high + 0.001 if low == high else float(high)
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high_f - low)).clamp(0, 1)
    keep = 1 - ramp  # weight of the original frequency
    return interpolated * (1 - keep) + extrapolated * keep


def yarn_cos_sin_cache(
    max_positions: int,
    rotary_dim: int = 64,
    base: float = 10000.0,
    factor: float = 40.0,
    original_max_position_embeddings: int = 4096,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    mscale: float = 1.0,
    mscale_all_dim: float = 1.0,
) -> torch.Tensor:
    """fp32 [max_positions, rotary_dim]: ``cat(cos * m, sin * m)`` per position (cos in the first half, as vLLM).

    angle[p, i] = fp32(p * inv_freq_i) (one rounding; positions are exact in fp32 below 2^24), cos/sin in fp32, and
    m = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) — exactly 1 for DeepSeek-V3. The attention
    magnitude correction lives in ``yarn_softmax_scale``, not here.
    """
    inv_freq = yarn_inv_freq(rotary_dim, base, factor, original_max_position_embeddings, beta_fast, beta_slow)
    angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    magnitude = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return torch.cat([angles.cos() * magnitude, angles.sin() * magnitude], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: x [T, ..., d] (d = rotary_dim), positions int [T], cos_sin fp32 [P, d].

    With c, s the cos and sin of token t's position at frequency i (cos_sin[pos, i], cos_sin[pos, d/2 + i]):
      out[2i]   = x[2i] * c - x[2i+1] * s
      out[2i+1] = x[2i] * s + x[2i+1] * c
    i.e. the complex product (x[2i] + j x[2i+1]) * (c + j s), computed in fp32 and rounded once to x's dtype.
    """
    d = x.shape[-1]
    _check(
        d % 2 == 0 and cos_sin.shape[-1] == d, f"x: last dim {d} must be even and match cos_sin's {cos_sin.shape[-1]}"
    )
    _check(positions.shape == x.shape[:1], f"positions: expected [{x.shape[0]}], got {tuple(positions.shape)}")
    _check(
        bool(((positions >= 0) & (positions < cos_sin.shape[0])).all()),
        f"positions: must lie in [0, {cos_sin.shape[0]})",
    )
    table = cos_sin[positions.long()].view(x.shape[0], *([1] * (x.dim() - 2)), d)  # broadcast over middle dims
    cos, sin = table[..., : d // 2], table[..., d // 2 :]
    xf = x.float()
    even, odd = xf[..., 0::2], xf[..., 1::2]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def deinterleave_rope_dims(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: ``cat(x[..., 0::2], x[..., 1::2])``, the interleaved rope layout in "rotate half" order.

    Hugging Face's rotate_half RoPE on ``deinterleave_rope_dims(x)`` with cos/sin repeated twice equals
    ``deinterleave_rope_dims(apply_rope(x))``: the same rotation of the same pairs, only stored in another order, so
    attention scores are identical in both forms.
    """
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def interleave_rope_dims(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``deinterleave_rope_dims``: [..., d] in rotate-half order -> interleaved pairs."""
    d = x.shape[-1]
    return torch.stack([x[..., : d // 2], x[..., d // 2 :]], dim=-1).flatten(-2)


def yarn_softmax_scale(qk_head_dim: int = 192, factor: float = 40.0, mscale_all_dim: float = 1.0) -> float:
    """Attention softmax scale of DeepSeek-V3: ``qk_head_dim**-0.5 * mscale**2``, mscale = yarn_mscale(factor,
    mscale_all_dim) (0.1 * mscale_all_dim * ln(factor) + 1 when factor > 1). No correction when mscale_all_dim is 0.

    The absorbed MLA decode (576-wide q·k) must use this value, not 576**-0.5: absorption changes the width of the dot
    product, not its value.
    """
    scale = qk_head_dim**-0.5
    if mscale_all_dim:
        mscale = yarn_mscale(factor, mscale_all_dim)
        scale = scale * mscale * mscale
    return scale
