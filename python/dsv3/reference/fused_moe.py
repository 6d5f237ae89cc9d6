"""The routed experts of a DeepSeek-V3 MoE layer on FP8 weights: the specification of dsv3.ops.fused_experts."""

from __future__ import annotations

import torch

from dsv3.reference.gemm import fp8_gemm_nt
from dsv3.reference.layers import silu_and_mul
from dsv3.reference.quant import per_token_group_quant_fp8

FP8Weights = tuple[torch.Tensor, torch.Tensor]  # (e4m3 [E, N, K], f32 [E, ceil(N/128), ceil(K/128)])


def _expert(x_q: torch.Tensor, x_s: torch.Tensor, w13: FP8Weights, w2: FP8Weights) -> torch.Tensor:
    """One expert's SwiGLU on quantized rows: bf16 [rows, H]."""
    h = fp8_gemm_nt((x_q, x_s), w13)
    a_q, a_s = per_token_group_quant_fp8(silu_and_mul(h))
    return fp8_gemm_nt((a_q, a_s), w2)


def fused_experts(
    x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    topk_weights: torch.Tensor,
    topk_idx: torch.Tensor,
    w13: FP8Weights,
    w2: FP8Weights,
    shared_w13: tuple[torch.Tensor, torch.Tensor] | None = None,
    shared_w2: tuple[torch.Tensor, torch.Tensor] | None = None,
    layout: str = "auto",
    max_m: int | None = None,
) -> torch.Tensor:
    """Weighted sum of each token's routed experts, plus the shared expert, every GEMM on FP8 operands as
    DeepSeek-V3 runs them.

    x: bf16 [T, H], or the tokens already quantized (e4m3 [T, H], f32 [T, H/128]) as per_token_group_quant_fp8(x)
    returns them, which gives the same result (in bf16); topk_weights f32 [T, k] and topk_idx int32 [T, k] from
    grouped_topk (-1: no expert);
    w13: expert e's gate and up projections stacked, e4m3 [E, 2I, H] with block scales [E, 2I/128, H/128];
    w2: the down projections, e4m3 [E, H, I] with block scales [E, H/128, I/128]. H and I are multiples of 128.

    For every slot (t, j) with e = topk_idx[t, j] >= 0, in bf16 between steps:
        h = fp8_gemm_nt(per_token_group_quant_fp8(x[t]), w13[e])      [2I]: gate then up
        a = silu_and_mul(h)                                           [I]
        y = fp8_gemm_nt(per_token_group_quant_fp8(a), w2[e])          [H]
    out[t] = sum over j of topk_weights[t, j] * y in fp32, added in slot order from +0, rounded once to bf16.
    With shared_w13 (e4m3 [2Is, H], scales [2Is/128, H/128]) and shared_w2 (e4m3 [H, Is], scales [H/128, Is/128]),
    the shared expert runs the same steps on every token and its bf16 output is added to out in bf16 (the rounded
    sum of the two rounded outputs, as the DeepSeek-V3 MoE layer adds them).
    layout and max_m select how dsv3.ops.fused_experts runs; they do not change the result.
    Returns bf16 [T, H].
    """
    t, k = topk_idx.shape
    quantized = isinstance(x, (tuple, list))
    x_q, x_s = x if quantized else per_token_group_quant_fp8(x)
    out = torch.zeros(t, x_q.shape[1], dtype=torch.float32, device=x_q.device)
    for slot in range(k):
        for expert in topk_idx[:, slot].unique().tolist():
            if expert < 0:
                continue
            rows = (topk_idx[:, slot] == expert).nonzero().squeeze(1)
            y = _expert(x_q[rows], x_s[rows], (w13[0][expert], w13[1][expert]), (w2[0][expert], w2[1][expert]))
            out[rows] += topk_weights[rows, slot, None] * y.float()
    out = out.to(torch.bfloat16 if quantized else x.dtype)
    if (shared_w13 is None) != (shared_w2 is None):
        raise ValueError("shared_w13/shared_w2: pass both (the shared expert) or neither")
    return out if shared_w13 is None else out + _expert(x_q, x_s, shared_w13, shared_w2)
