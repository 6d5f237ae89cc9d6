"""The routed experts of a MoE layer (and optionally its shared expert) as one call: token layout, grouped FP8 GEMMs,
SiLU-and-mul, weighted combine.

Semantics are those of dsv3.reference.fused_experts. Three ways to run it, all equal to the reference:

* ``layout="auto"`` on the CPU: one C++ call (csrc/cpu/moe_fused.cpp) that quantizes each token once, gathers an
  expert's rows while decoding them in the gate/up GEMM, runs each GEMM as one batch over the experts, fuses
  SiLU-and-mul with the quantization and adds the shared expert in the combine.
* ``layout="contiguous"`` (prefill on a GPU): permute (FP8 quantization fused) -> grouped gate/up GEMM ->
  SiLU-and-mul -> quantization -> grouped down GEMM -> unpermute (weighted sum in fp32, slot order).
* ``layout="masked"`` (decode on a GPU): the same steps over the [E, max_m, H] layout, whose row counts stay on the
  device (no host synchronization, so the call can be captured in a CUDA graph).

``"auto"`` on a GPU picks masked up to MASKED_MAX_TOKENS tokens, contiguous above.
"""

from __future__ import annotations

import torch

from dsv3.ops.extension import custom_op, run_kernel
from dsv3.ops.gemm import fp8_gemm_nt, fp8_linear
from dsv3.ops.grouped_gemm import m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked
from dsv3.ops.moe import (
    moe_contiguous_layout,
    moe_masked_layout,
    permute_tokens,
    permute_tokens_masked,
    unpermute_tokens,
    unpermute_tokens_masked,
)
from dsv3.ops.quant import silu_and_mul_quant_fp8
from dsv3.ops.tensor_checks import check_aligned, check_tensor
from dsv3.reference.quant import FP8_DTYPE

FP8Weights = tuple[torch.Tensor, torch.Tensor]
FP8Tokens = tuple[torch.Tensor, torch.Tensor]  # (e4m3 [T, H], f32 [T, H / 128])
LAYOUTS = ("auto", "contiguous", "masked")
# Decode batches up to this many tokens take the masked layout on a GPU: its [E, max_m = T, H] buffers grow with
# E * T, the contiguous layout's with T * k, and it needs no host synchronization.
MASKED_MAX_TOKENS = 64


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


def _check_tokens(x: object) -> torch.Tensor | FP8Tokens:
    if not isinstance(x, (tuple, list)):
        check_tensor(x, "x", dtypes=(torch.bfloat16,), ndim=2)
        return x
    if len(x) != 2:
        raise TypeError("x: expected a bf16 tensor or a (values, scales) pair of quantized tokens")
    codes, scales = x
    check_tensor(codes, "x", dtypes=(FP8_DTYPE,), ndim=2)
    tokens, hidden = codes.shape
    check_tensor(scales, "x scales", dtypes=(torch.float32,), shape=(tokens, -(-hidden // 128)), device=codes.device)
    return codes, scales


def _check_shared_weights(shared_w13: object, shared_w2: object, hidden: int, device) -> tuple[FP8Weights, FP8Weights]:
    if (shared_w13 is None) != (shared_w2 is None):
        raise ValueError("shared_w13/shared_w2: pass both (the shared expert) or neither")
    for weights, name in ((shared_w13, "shared_w13"), (shared_w2, "shared_w2")):
        if not isinstance(weights, (tuple, list)) or len(weights) != 2:
            raise TypeError(f"{name}: expected a (values, scales) pair of tensors")
    (q13, s13), (q2, s2) = shared_w13, shared_w2
    check_tensor(q13, "shared_w13", dtypes=(FP8_DTYPE,), shape=(None, hidden), device=device)
    two_i = q13.shape[0]
    if two_i % 256:
        raise ValueError(f"shared_w13: expected [2I, {hidden}] with I a multiple of 128, got {list(q13.shape)}")
    check_tensor(s13, "shared_w13 scales", dtypes=(torch.float32,), shape=(two_i // 128, hidden // 128), device=device)
    check_tensor(q2, "shared_w2", dtypes=(FP8_DTYPE,), shape=(hidden, two_i // 2), device=device)
    check_tensor(s2, "shared_w2 scales", dtypes=(torch.float32,), shape=(hidden // 128, two_i // 256), device=device)
    return (q13, s13), (q2, s2)


def _fused_moe_shapes(x: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)


@custom_op("fused_moe", fake=_fused_moe_shapes)
def _fused_moe_cpu(
    x: torch.Tensor,
    x_scales: torch.Tensor | None,
    topk_weights: torch.Tensor,
    topk_idx: torch.Tensor,
    w13: torch.Tensor,
    w13_scales: torch.Tensor,
    w2: torch.Tensor,
    w2_scales: torch.Tensor,
    shared_w13: torch.Tensor | None,
    shared_w13_scales: torch.Tensor | None,
    shared_w2: torch.Tensor | None,
    shared_w2_scales: torch.Tensor | None,
) -> torch.Tensor:
    check_aligned(x=x)
    tokens, hidden = x.shape
    experts, two_i, _ = w13.shape
    out = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=x.device)

    def address(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.data_ptr()

    # x is bf16 tokens, or (with x_scales) their e4m3 codes
    tokens_in = (0, x.data_ptr(), x_scales.data_ptr()) if x_scales is not None else (x.data_ptr(), 0, 0)
    shared = (shared_w13, shared_w13_scales, shared_w2, shared_w2_scales)
    run_kernel(
        "fused_moe", x.device, *tokens_in, topk_weights.data_ptr(), topk_idx.data_ptr(), w13.data_ptr(),
        w13_scales.data_ptr(), w2.data_ptr(), w2_scales.data_ptr(), *(address(t) for t in shared), out.data_ptr(),
        tokens, topk_idx.shape[1], experts, hidden, two_i // 2, 0 if shared_w13 is None else shared_w13.shape[0] // 2,
    )  # fmt: skip
    return out


def _permuted(x: torch.Tensor | FP8Tokens, layout, permute) -> FP8Tokens:
    """The layout's rows of the quantized tokens: quantized on the way, or (already quantized) their codes and
    scales copied bit for bit, the codes through a bf16 view (permute copies float rows)."""
    if not isinstance(x, tuple):
        return permute(x, layout, quantize=True)
    codes, scales = x
    return permute(codes.view(torch.bfloat16), layout).view(FP8_DTYPE), permute(scales, layout)


def swiglu_fp8(x: torch.Tensor | FP8Tokens, w13: FP8Weights, w2: FP8Weights) -> torch.Tensor:
    """A SwiGLU MLP as dense FP8 GEMMs, down(silu_and_mul(gate_up(x))), bf16 [T, H]: the shared expert here, and the
    model's dense MLPs. w13: gate and up stacked, [2I, H]; bf16 tokens are quantized inside the first GEMM
    (fp8_linear: the same bits as quantizing first); SiLU-and-mul is fused with the down GEMM's input quantization."""
    h = fp8_gemm_nt(x, w13) if isinstance(x, tuple) else fp8_linear(x, w13)
    return fp8_gemm_nt(silu_and_mul_quant_fp8(h), w2)


def _routed_contiguous(x, topk_weights, topk_idx, w13, w2) -> torch.Tensor:
    layout = moe_contiguous_layout(topk_idx, w13[0].shape[0], alignment=1)
    q, scales = _permuted(x, layout, permute_tokens)
    h = m_grouped_fp8_gemm_nt_contiguous((q, scales), w13, layout.m_indices)
    y = m_grouped_fp8_gemm_nt_contiguous(silu_and_mul_quant_fp8(h), w2, layout.m_indices)
    return unpermute_tokens(y, layout, topk_weights)


def _routed_masked(x, topk_weights, topk_idx, w13, w2, max_m: int) -> torch.Tensor:
    """Rows of an expert past masked_m are never written by the GEMMs; the SiLU and quantization in between run
    over them (whatever they hold) but nothing reads their results: the down GEMM stops at masked_m and the combine
    reads only the rows the layout assigned."""
    experts = w13[0].shape[0]
    layout = moe_masked_layout(topk_idx, experts, max_m)
    q, scales = _permuted(x, layout, permute_tokens_masked)
    expected_m = max(1, -(-topk_idx.numel() // experts))
    h = m_grouped_fp8_gemm_nt_masked((q, scales), w13, layout.masked_m, expected_m)
    y = m_grouped_fp8_gemm_nt_masked(silu_and_mul_quant_fp8(h), w2, layout.masked_m, expected_m)
    return unpermute_tokens_masked(y, layout, topk_weights)


def fused_experts(
    x: torch.Tensor | FP8Tokens,
    topk_weights: torch.Tensor,
    topk_idx: torch.Tensor,
    w13: FP8Weights,
    w2: FP8Weights,
    shared_w13: FP8Weights | None = None,
    shared_w2: FP8Weights | None = None,
    layout: str = "auto",
    max_m: int | None = None,
) -> torch.Tensor:
    """out [T, H] bf16 = for each token, the topk_weights-weighted sum of its routed experts' SwiGLU outputs, plus
    the shared expert's output when given.

    x: bf16 [T, H], or the tokens already quantized as per_token_group_quant_fp8 does it (e4m3 [T, H],
    f32 [T, H/128]), e.g. as an FP8 expert-parallel dispatch delivers them: the result is then the same as for the
    bf16 tokens they came from. topk_weights: f32 [T, k]; topk_idx: int32 [T, k] (-1: no expert), e.g. from
    grouped_topk; w13: (e4m3 [E, 2I, H], f32 [E, 2I/128, H/128]) gate and up projections stacked; w2: (e4m3 [E, H, I],
    f32 [E, H/128, I/128]) down projections. H and I must be multiples of 128.
    shared_w13 / shared_w2: the shared expert, (e4m3 [2Is, H], f32 [2Is/128, H/128]) and (e4m3 [H, Is],
    f32 [H/128, Is/128]); its bf16 output is added to the bf16 routed output (as the DeepSeek-V3 MoE layer does).
    layout: "auto", "contiguous" or "masked" (see the module docstring). max_m (masked only): rows per expert, by
    default T, which holds every expert's rows when no token picks an expert twice (grouped_topk never does); an
    expert receiving more raises ValueError on the CPU and is reported by the layout's errors on a GPU.
    """
    x = _check_tokens(x)
    values = x[0] if isinstance(x, tuple) else x
    (tokens, hidden), device = values.shape, values.device
    check_tensor(topk_idx, "topk_idx", dtypes=(torch.int32,), shape=(tokens, None), device=device)
    check_tensor(topk_weights, "topk_weights", dtypes=(torch.float32,), shape=tuple(topk_idx.shape), device=device)
    w13 = _check_expert_weights(w13, "w13", None, None, hidden, device)
    experts, two_i, _ = w13[0].shape
    w2 = _check_expert_weights(w2, "w2", experts, hidden, two_i // 2, device)
    if hidden % 128 or two_i % 256:
        raise ValueError(f"w13/w2: H={hidden} and I={two_i // 2} must be multiples of 128")
    shared = None
    if shared_w13 is not None or shared_w2 is not None:
        shared = _check_shared_weights(shared_w13, shared_w2, hidden, device)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if max_m is not None and (isinstance(max_m, bool) or not isinstance(max_m, int) or max_m < 1):
        raise ValueError(f"max_m: expected a positive int, got {max_m!r}")
    if layout == "auto":
        if device.type == "cpu":
            s13, s2 = shared if shared is not None else ((None, None), (None, None))
            tokens_in = x if isinstance(x, tuple) else (x, None)
            return _fused_moe_cpu(*tokens_in, topk_weights, topk_idx, *w13, *w2, *s13, *s2)
        layout = "masked" if tokens <= MASKED_MAX_TOKENS else "contiguous"
    if layout == "masked":
        out = _routed_masked(x, topk_weights, topk_idx, w13, w2, max(tokens, 1) if max_m is None else max_m)
    else:
        out = _routed_contiguous(x, topk_weights, topk_idx, w13, w2)
    return out if shared is None else out + swiglu_fp8(x, *shared)
