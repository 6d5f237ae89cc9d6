"""The elementwise layers between the GEMMs: RMSNorm, residual add + RMSNorm, and interleaved rotary embedding.

Semantics are those of dsv3.reference.layers. RoPE is bit-exact on both backends (the same fp32 operations in the same
order); RMSNorm sums the squares in another order than torch, so it may differ from the reference by one rounding of
the output dtype.
"""

from __future__ import annotations

import torch

from dsv3.ops.extension import DTYPE_CODES, FLOAT_DTYPES, custom_op, run_kernel
from dsv3.ops.tensor_checks import check_aligned, check_tensor


def _no_output(*args) -> None:
    return None


@custom_op("rms_norm", fake=_no_output, mutates_args=("out",))
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float) -> None:
    check_aligned(x=x, weight=weight, out=out)
    hidden = x.shape[-1]
    run_kernel(
        "rms_norm", x.device, x.data_ptr(), 0, 0, weight.data_ptr(), out.data_ptr(), DTYPE_CODES[x.dtype],
        x.numel() // hidden, hidden, eps,
    )  # fmt: skip


@custom_op("fused_add_rms_norm", fake=_no_output, mutates_args=("out", "residual_out"))
def _fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, residual_out: torch.Tensor,
    eps: float,
) -> None:  # fmt: skip
    check_aligned(x=x, residual=residual, weight=weight, out=out, residual_out=residual_out)
    hidden = x.shape[-1]
    run_kernel(
        "rms_norm", x.device, x.data_ptr(), residual.data_ptr(), residual_out.data_ptr(), weight.data_ptr(),
        out.data_ptr(), DTYPE_CODES[x.dtype], x.numel() // hidden, hidden, eps,
    )  # fmt: skip


def _check_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_tensor(x, "x", dtypes=FLOAT_DTYPES, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError("x: the last dimension must not be empty")
    check_tensor(weight, "weight", dtypes=(x.dtype,), shape=(x.shape[-1],), device=x.device)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps: expected a non-negative number, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dimension: fp32 math, the normalized value rounded to x's
    dtype, then multiplied by the weight and rounded again (Hugging Face DeepseekV3RMSNorm).

    x: bf16/fp16/fp32 [..., H], contiguous; weight: [H] in x's dtype. Returns a new tensor like x.
    """
    _check_norm(x, weight, eps)
    out = torch.empty_like(x)
    _rms_norm(x, weight, out, float(eps))
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) with the sum rounded once to the dtype, in one pass over the rows.

    x, residual: [..., H] of one dtype, contiguous; weight [H]. Returns new tensors (normalized, new residual).
    """
    _check_norm(x, weight, eps)
    check_tensor(residual, "residual", dtypes=(x.dtype,), shape=tuple(x.shape), device=x.device)
    out, residual_out = torch.empty_like(x), torch.empty_like(x)
    _fused_add_rms_norm(x, residual, weight, out, residual_out, float(eps))
    return out, residual_out


@custom_op("apply_rope", fake=_no_output, mutates_args=("out",))
def _apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, out: torch.Tensor) -> None:
    check_aligned(x=x, positions=positions, cos_sin=cos_sin, out=out)
    tokens, heads, dim = x.shape
    run_kernel(
        "apply_rope", x.device, x.data_ptr(), out.data_ptr(), DTYPE_CODES[x.dtype], positions.data_ptr(),
        cos_sin.data_ptr(), tokens, heads, dim, x.stride(0), x.stride(1), cos_sin.shape[0],
    )  # fmt: skip


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by each token's position: see dsv3.reference.layers.apply_rope.

    x: bf16/fp16/fp32 [T, d] or [T, heads, d] (d even) whose last dimension is contiguous; the other dimensions may
    be strided, e.g. the rope slice of a wider projection. positions: int64 [T]; cos_sin: fp32 [P, d] (cos then sin
    of each frequency). Returns a new contiguous tensor shaped like x. Positions outside [0, P) raise ValueError on
    the CPU; on CUDA (where checking would synchronize with the host) they are never read and give NaN rows.
    """
    check_tensor(x, "x", dtypes=FLOAT_DTYPES, contiguous=False)
    if x.dim() not in (2, 3) or x.shape[-1] % 2 or (x.shape[-1] > 1 and x.stride(-1) != 1):
        raise ValueError(f"x: expected [T, d] or [T, heads, d] with an even, contiguous last dim, got {tuple(x.shape)}")
    check_tensor(positions, "positions", dtypes=(torch.int64,), shape=(x.shape[0],), device=x.device)
    check_tensor(cos_sin, "cos_sin", dtypes=(torch.float32,), shape=(None, x.shape[-1]), device=x.device)
    rows = x if x.dim() == 3 else x.unsqueeze(1)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    _apply_rope(rows, positions, cos_sin, out)
    return out.view(x.shape)
