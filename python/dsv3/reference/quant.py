"""FP8 (e4m3) quantization: the specification every quantization kernel must reproduce bit for bit.

Rules shared by every quantizer in dsv3:

* a group's scale is ``max(amax, 1e-4) / 448`` where amax is the largest magnitude in the group (NaN propagates);
* with ``ue8m0=True`` the scale is rounded up to the nearest power of two (the smallest ``2**e >= scale``), so it is
  exactly representable as an 8-bit exponent;
* the quantized value is ``clamp(x / scale, -448, 448)`` rounded to nearest-even e4m3 (true IEEE division, no
  reciprocal multiply);
* dequantization is ``q * scale`` in fp32, then rounded to the requested dtype.

The weights of the official checkpoint use 128x128 blocks with the scale stored as ``weight_scale_inv`` (the name is
historical: it is the multiplier that dequantizes). Edge blocks are padded: they cover only the valid rows/columns.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale, for positive finite fp32 scales (NaN and inf pass through)."""
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    rounded = torch.ldexp(torch.ones_like(scale), exponent)
    return torch.where(torch.isfinite(scale), rounded, scale)


def scale_from_amax(amax: torch.Tensor, ue8m0: bool = False) -> torch.Tensor:
    """fp32 scale of a group from its fp32 amax (a correctly rounded division, on every device)."""
    # Divided by a tensor, not a Python number: PyTorch's CUDA kernels multiply by the rounded reciprocal of a scalar
    # divisor, which is one ulp off for some amax and then moves codes across a rounding boundary.
    scale = amax.clamp(min=AMAX_FLOOR) / torch.tensor(FP8_MAX, device=amax.device)
    return round_scale_ue8m0(scale) if ue8m0 else scale


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 of fp32 ``x / scale`` (scale broadcast against x), saturated to +-448."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def per_token_group_quant_fp8(
    x: torch.Tensor, group_size: int = 128, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per token and per ``group_size`` consecutive channels.

    x: bf16/fp16/fp32 [..., K], K a multiple of group_size.
    Returns q e4m3 [..., K] and scales f32 [..., K // group_size] with x ~= q * scale (scale repeated over its group).
    """
    *lead, k = x.shape
    groups = x.float().reshape(*lead, k // group_size, group_size)
    scale = scale_from_amax(groups.abs().amax(dim=-1, keepdim=True), ue8m0)
    q = quantize_with_scale(groups, scale)
    return q.reshape(*lead, k), scale.squeeze(-1)


def expand_block_scales(scale: torch.Tensor, rows: int, cols: int, block: int = 128) -> torch.Tensor:
    """Repeat a [ceil(rows/block), ceil(cols/block)] block-scale grid to [rows, cols], dropping the padding."""
    full = scale.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)
    return full[:rows, :cols]


def per_block_quant_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight matrix in block x block tiles (edge tiles cover the remainder).

    w: bf16/fp16/fp32 [N, K]. Returns q e4m3 [N, K] and scale_inv f32 [ceil(N/block), ceil(K/block)].
    """
    n, k = w.shape
    wf = w.float()
    padded = wf.new_zeros(ceil_div(n, block) * block, ceil_div(k, block) * block)
    padded[:n, :k] = wf.abs()
    tiles = padded.reshape(ceil_div(n, block), block, ceil_div(k, block), block)
    amax = tiles.amax(dim=(1, 3))
    # Zero padding cannot raise a tile's amax, but a NaN in the valid part must reach it: amax above propagates NaN.
    scale = scale_from_amax(amax)
    q = quantize_with_scale(wf, expand_block_scales(scale, n, k, block))
    return q, scale


def dequant_fp8_block(
    q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Dequantize a block-quantized weight: ``q [N, K] * scale_inv`` expanded over block x block tiles."""
    n, k = q.shape
    return (q.float() * expand_block_scales(scale_inv, n, k, block)).to(dtype)


def dequant_per_token_group(q: torch.Tensor, scale: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """fp32 ``q [..., K] * scale [..., K // group_size]`` with each scale repeated over its group."""
    return q.float() * scale.repeat_interleave(group_size, dim=-1)


def silu_and_mul_quant_fp8(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of a SwiGLU down projection: per_token_group_quant_fp8(silu_and_mul(h)) for h bf16 [..., 2I]."""
    from dsv3.reference.layers import silu_and_mul

    return per_token_group_quant_fp8(silu_and_mul(h))
