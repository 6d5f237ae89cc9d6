"""The routed experts of a MoE layer as one call: token layout, grouped FP8 GEMMs, SiLU-and-mul, weighted combine.

Semantics are those of dsv3.reference.fused_moe.fused_experts; every step is a dsv3 kernel on the CPU or the GPU:
permute (with the FP8 quantization fused) -> grouped gate/up GEMM -> SiLU-and-mul -> FP8 quantization -> grouped
down GEMM -> unpermute (weighted sum in fp32, slot order).
"""

from __future__ import annotations

import torch

from dsv3.ops.grouped_gemm import m_grouped_fp8_gemm_nt_contiguous
from dsv3.ops.moe import moe_contiguous_layout, permute_tokens, unpermute_tokens
from dsv3.ops.quant import per_token_group_quant_fp8
from dsv3.ops.tensor_checks import check_tensor
from dsv3.reference.layers import silu_and_mul
from dsv3.reference.quant import FP8_DTYPE

FP8Weights = tuple[torch.Tensor, torch.Tensor]


def _check_expert_weights(weights: object, name: str, experts: int | None, n: int | None, k: int, device) -> FP8Weights:
    if not isinstance(weights, (tuple, list)) or len(weights) != 2:
        raise TypeError(f"{name}: expected a (values, scales) pair of tensors")
    q, s = weights
    check_tensor(q, name, dtypes=(FP8_DTYPE,), shape=(experts, n, k), device=device)
    e, rows, cols = q.shape
    check_tensor(
        s, f"{name} scales", dtypes=(torch.float32,), shape=(e, -(-rows // 128), -(-cols // 128)), device=device
    )
    return q, s


def fused_experts(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_idx: torch.Tensor, w13: FP8Weights, w2: FP8Weights
) -> torch.Tensor:
    """out [T, H] bf16 = for each token, the topk_weights-weighted sum of its routed experts' SwiGLU outputs.

    x: bf16 [T, H]; topk_weights: f32 [T, k]; topk_idx: int32 [T, k] (-1: no expert), e.g. from grouped_topk;
    w13: (e4m3 [E, 2I, H], f32 [E, 2I/128, H/128]) gate and up projections stacked; w2: (e4m3 [E, H, I],
    f32 [E, H/128, I/128]) down projections. H and I must be multiples of 128.
    """
    check_tensor(x, "x", dtypes=(torch.bfloat16,), ndim=2)
    tokens, hidden = x.shape
    check_tensor(topk_idx, "topk_idx", dtypes=(torch.int32,), shape=(tokens, None), device=x.device)
    check_tensor(topk_weights, "topk_weights", dtypes=(torch.float32,), shape=tuple(topk_idx.shape), device=x.device)
    w13 = _check_expert_weights(w13, "w13", None, None, hidden, x.device)
    experts, two_i, _ = w13[0].shape
    w2 = _check_expert_weights(w2, "w2", experts, hidden, two_i // 2, x.device)
    if hidden % 128 or two_i % 256:
        raise ValueError(f"w13/w2: H={hidden} and I={two_i // 2} must be multiples of 128")
    layout = moe_contiguous_layout(topk_idx, experts, alignment=1)
    q, scales = permute_tokens(x, layout, quantize=True)
    h = m_grouped_fp8_gemm_nt_contiguous((q, scales), w13, layout.m_indices)
    a_q, a_scales = per_token_group_quant_fp8(silu_and_mul(h))
    y = m_grouped_fp8_gemm_nt_contiguous((a_q, a_scales), w2, layout.m_indices)
    return unpermute_tokens(y, layout, topk_weights)
