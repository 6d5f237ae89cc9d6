"""FP8 block-scaled GEMM (fp8_gemm_nt) on DeepSeek-V3 shapes vs torch's bf16 linear on the dequantized weight, the
plain-torch way to run an FP8 checkpoint; on CUDA also vs torch._scaled_mm with per-tensor scales (FP8 tensor cores,
no block scales: an upper bound for what cuBLAS offers) where this torch has it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dsv3
from dsv3.bench.harness import Report, Row, Timer, memory_roof_rows
from dsv3.reference.quant import ceil_div

# (N, K) of DeepSeek-V3's FP8 projections: kv_a (576), q_a (1536), q_b (128 heads x 192), o_proj (128 heads x 128 in),
# an expert's down (2048 in), fused gate+up (2 x 2048 out) and gate or up alone
SHAPES = [(576, 7168), (1536, 7168), (24576, 1536), (7168, 16384), (7168, 2048), (4096, 7168), (2048, 7168)]
TOKENS = [1, 16, 64, 128, 512, 4096]


def _cases(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """(M, N, K) to time: all of them on a GPU; on the CPU a subset that runs in ~20 s on two cores."""
    if device.type == "cuda":
        tokens = [1, 128, 4096] if quick else TOKENS
        return [(m, n, k) for n, k in SHAPES for m in tokens]
    if quick:
        return [(m, n, k) for n, k in [(576, 7168), (4096, 7168)] for m in (1, 16)]
    decode = [(m, n, k) for n, k in [(576, 7168), (4096, 7168), (7168, 2048)] for m in (1, 16, 64)]
    return [*decode, (128, 4096, 7168), (128, 7168, 2048), (512, 4096, 7168)]


def _scaled_mm_us(timer: Timer, a: torch.Tensor, b: torch.Tensor) -> float | None:
    """torch._scaled_mm with unit per-tensor scales, or None where this torch or shape does not support it."""
    if not hasattr(torch, "_scaled_mm"):
        return None
    one = torch.ones((), device=a.device)
    try:
        torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError):
        return None
    return timer(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))


def run(device: torch.device, quick: bool = False, reps: int | None = None) -> Report:
    timer = Timer(device, warmup=2, reps=reps or (5 if quick or device.type == "cpu" else 20))
    report = Report(f"FP8 block-scaled GEMM on {device.type}")
    for row in memory_roof_rows(timer, device):
        report.add(row)
    weights: dict[tuple[int, int], tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
    for m, n, k in _cases(device, quick):
        if (n, k) not in weights:
            b = dsv3.per_block_quant_fp8(torch.randn(n, k, device=device) * 0.02)
            weights.clear()  # one weight (and its bf16 copy) alive at a time
            weights[(n, k)] = (b, dsv3.dequant_fp8_block(*b, dtype=torch.bfloat16))
        b, w_bf16 = weights[(n, k)]
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        a = dsv3.per_token_group_quant_fp8(x)
        out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
        scale_bytes = 4 * (m * ceil_div(k, 128) + ceil_div(n, 128) * ceil_div(k, 128))
        moved = m * k + n * k + scale_bytes + 2 * m * n
        case = f"M={m} N={n} K={k}"
        us, baseline_us = timer.pair(
            lambda a=a, b=b, out=out: dsv3.fp8_gemm_nt(a, b, out=out), lambda x=x, w=w_bf16: F.linear(x, w)
        )
        report.add(
            Row(
                "fp8_gemm_nt", case, device.type, us=us,
                bytes=moved, flops=2 * m * n * k, peak="fp8_flops",
                baseline="torch bf16 linear", baseline_us=baseline_us,
            )
        )  # fmt: skip
        scaled_mm_us = _scaled_mm_us(timer, a[0], b[0]) if device.type == "cuda" else None
        if scaled_mm_us is not None:
            report.add(
                Row(
                    "torch._scaled_mm per-tensor", case, device.type, us=scaled_mm_us,
                    bytes=moved - scale_bytes, flops=2 * m * n * k, peak="fp8_flops",
                    baseline="torch bf16 linear", baseline_us=baseline_us,
                )
            )  # fmt: skip
    return report
