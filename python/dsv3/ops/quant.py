"""FP8 quantization ops: per-token groups for activations, 128x128 blocks for weights, and block dequantization.

Semantics are those of dsv3.reference.quant, reproduced bit for bit by the CPU and CUDA kernels.
"""

from __future__ import annotations

import torch

from dsv3.ops.extension import DTYPE_CODES, FLOAT_DTYPES, custom_op, run_kernel
from dsv3.ops.tensor_checks import check_aligned, check_positive_int, check_tensor
from dsv3.reference.quant import FP8_DTYPE, ceil_div


def _token_quant_shapes(x: torch.Tensor, group_size: int, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scales_shape = (*x.shape[:-1], x.shape[-1] // group_size)
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty(scales_shape, dtype=torch.float32)


@custom_op("per_token_group_quant_fp8", fake=_token_quant_shapes)
def _per_token_group_quant_fp8(x: torch.Tensor, group_size: int, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    check_aligned(x=x)
    k = x.shape[-1]
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(*x.shape[:-1], k // group_size, dtype=torch.float32, device=x.device)
    rows = x.numel() // k if k else 0
    x_args = (x.data_ptr(), DTYPE_CODES[x.dtype])
    run_kernel(
        "per_token_group_quant_fp8", x.device, *x_args, q.data_ptr(), scales.data_ptr(), rows, k, group_size, ue8m0
    )
    return q, scales


def per_token_group_quant_fp8(
    x: torch.Tensor, group_size: int = 128, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per token and per `group_size` channels to FP8 e4m3.

    x: bf16/fp16/fp32 [..., K], contiguous, K a multiple of group_size.
    Returns (q e4m3 [..., K], scales f32 [..., K // group_size]); scale = max(amax, 1e-4) / 448 (rounded up to a
    power of two when ue8m0) and q = x / scale.
    """
    check_tensor(x, "x", dtypes=FLOAT_DTYPES, min_ndim=1)
    check_positive_int(group_size, "group_size")
    if x.shape[-1] % group_size:
        raise ValueError(f"x: last dimension {x.shape[-1]} is not a multiple of group_size={group_size}")
    return _per_token_group_quant_fp8(x, group_size, bool(ue8m0))


def _silu_mul_quant_shapes(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inter = h.shape[-1] // 2
    return (
        h.new_empty((*h.shape[:-1], inter), dtype=FP8_DTYPE),
        h.new_empty((*h.shape[:-1], inter // 128), dtype=torch.float32),
    )


@custom_op("silu_and_mul_quant_fp8", fake=_silu_mul_quant_shapes)
def _silu_and_mul_quant_fp8(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inter = h.shape[-1] // 2
    q = torch.empty((*h.shape[:-1], inter), dtype=FP8_DTYPE, device=h.device)
    scales = torch.empty((*h.shape[:-1], inter // 128), dtype=torch.float32, device=h.device)
    check_aligned(h=h, q=q)
    rows = h.numel() // h.shape[-1] if h.shape[-1] else 0
    run_kernel("silu_and_mul_quant_fp8", h.device, h.data_ptr(), q.data_ptr(), scales.data_ptr(), rows, inter)
    return q, scales


def silu_and_mul_quant_fp8(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 input of a SwiGLU down projection from its gate/up output, in one pass:
    per_token_group_quant_fp8(silu_and_mul(h)).

    h: bf16 [..., 2I], contiguous, gate first ([..., :I]) then up, I a multiple of 128. Each value
    bf16(silu(gate) * up) (SiLU in fp32) is quantized per token and 128 channels. Returns (q e4m3 [..., I],
    scales f32 [..., I / 128]). The CUDA kernel matches the reference computed on the GPU bit for bit; the CPU one
    computes exp with its own vector code, whose last-bit differences can move a product to the neighbouring bf16
    value (and so, rarely, a code or a group's scale).
    """
    check_tensor(h, "h", dtypes=(torch.bfloat16,), min_ndim=1)
    if h.shape[-1] % 256:
        raise ValueError(f"h: last dimension {h.shape[-1]} must be twice a multiple of 128")
    return _silu_and_mul_quant_fp8(h)


def _block_quant_shapes(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    return w.new_empty(w.shape, dtype=FP8_DTYPE), w.new_empty(ceil_div(n, block), ceil_div(k, block))


@custom_op("per_block_quant_fp8", fake=_block_quant_shapes)
def _per_block_quant_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_aligned(w=w)
    n, k = w.shape
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scale_inv = torch.empty(ceil_div(n, block), ceil_div(k, block), dtype=torch.float32, device=w.device)
    w_args = (w.data_ptr(), DTYPE_CODES[w.dtype])
    run_kernel("per_block_quant_fp8", w.device, *w_args, q.data_ptr(), scale_inv.data_ptr(), n, k, block)
    return q, scale_inv


def per_block_quant_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight matrix to FP8 e4m3 in block x block tiles, as the official DeepSeek-V3 checkpoint stores it.

    w: bf16/fp16/fp32 [N, K], contiguous. Returns (q e4m3 [N, K], scale_inv f32 [ceil(N/block), ceil(K/block)]);
    edge tiles cover the remaining rows/columns only.
    """
    check_tensor(w, "w", dtypes=FLOAT_DTYPES, ndim=2)
    check_positive_int(block, "block")
    return _per_block_quant_fp8(w, block)


def _dequant_shapes(q: torch.Tensor, scale_inv: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=dtype)


@custom_op("dequant_fp8_block", fake=_dequant_shapes)
def _dequant_fp8_block(q: torch.Tensor, scale_inv: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    check_aligned(q=q, scale_inv=scale_inv)
    n, k = q.shape
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    out_args = (out.data_ptr(), DTYPE_CODES[dtype])
    run_kernel("dequant_fp8_block", q.device, q.data_ptr(), scale_inv.data_ptr(), *out_args, n, k, block)
    return out


def dequant_fp8_block(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16, block: int = 128
) -> torch.Tensor:
    """Dequantize a block-quantized weight: q e4m3 [N, K] times scale_inv f32 [ceil(N/block), ceil(K/block)]
    expanded over its tiles, rounded to `dtype` (bf16, fp16 or fp32)."""
    check_tensor(q, "q", dtypes=(FP8_DTYPE,), ndim=2)
    check_positive_int(block, "block")
    n, k = q.shape
    scale_shape = (ceil_div(n, block), ceil_div(k, block))
    check_tensor(scale_inv, "scale_inv", dtypes=(torch.float32,), shape=scale_shape, device=q.device)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    return _dequant_fp8_block(q, scale_inv, block, dtype)
