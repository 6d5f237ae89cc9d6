"""FP8 quantization ops (and SiLU-and-mul fused with it) vs the plain-torch reference (dsv3.reference.quant) on
DeepSeek-V3 shapes."""

from __future__ import annotations

import torch

import dsv3
from dsv3.bench.harness import Report, Row, Timer
from dsv3.reference import quant as ref

HIDDEN = 7168  # DeepSeek-V3 hidden size: the K of every activation quantization before a projection
MOE_INTERMEDIATE = 2048  # an expert's intermediate size: the K of its down projection


def run(device: torch.device, quick: bool = False, reps: int | None = None) -> Report:
    timer = Timer(device, warmup=2, reps=reps or (5 if quick else 20))
    report = Report(f"FP8 quantization on {device.type}")
    token_counts = [1, 128] if quick else [1, 128, 4096]
    for m in token_counts:
        x = torch.randn(m, HIDDEN, dtype=torch.bfloat16, device=device)
        moved = x.numel() * 2 + x.numel() + (x.numel() // 128) * 4  # bf16 in, e4m3 + fp32 scales out
        report.add(
            Row(
                "per_token_group_quant_fp8", f"M={m} K={HIDDEN}", device.type,
                us=timer(lambda x=x: dsv3.per_token_group_quant_fp8(x)), bytes=moved,
                baseline="reference", baseline_us=timer(lambda x=x: ref.per_token_group_quant_fp8(x)),
            )
        )  # fmt: skip
    for m in token_counts:  # the down projection's input of DeepSeek-V3 experts (intermediate 2048)
        h = torch.randn(m, 2 * MOE_INTERMEDIATE, dtype=torch.bfloat16, device=device)
        moved = h.numel() * 2 + h.numel() // 2 + (h.numel() // 256) * 4  # bf16 in, e4m3 + fp32 scales out
        report.add(
            Row(
                "silu_and_mul_quant_fp8", f"M={m} 2I={2 * MOE_INTERMEDIATE}", device.type,
                us=timer(lambda h=h: dsv3.silu_and_mul_quant_fp8(h)), bytes=moved,
                baseline="reference", baseline_us=timer(lambda h=h: ref.silu_and_mul_quant_fp8(h)),
            )
        )  # fmt: skip
    weight_shapes = [(576, HIDDEN)] if quick else [(576, HIDDEN), (HIDDEN, 2048), (4096, HIDDEN)]
    for n, k in weight_shapes:
        w = torch.randn(n, k, dtype=torch.bfloat16, device=device)
        q, s = dsv3.per_block_quant_fp8(w)
        quant_bytes = w.numel() * 3 + s.numel() * 4
        report.add(
            Row(
                "per_block_quant_fp8", f"N={n} K={k}", device.type,
                us=timer(lambda w=w: dsv3.per_block_quant_fp8(w)), bytes=quant_bytes,
                baseline="reference", baseline_us=timer(lambda w=w: ref.per_block_quant_fp8(w)),
            )
        )  # fmt: skip
        report.add(
            Row(
                "dequant_fp8_block", f"N={n} K={k} ->bf16", device.type,
                us=timer(lambda q=q, s=s: dsv3.dequant_fp8_block(q, s)), bytes=quant_bytes,
                baseline="reference", baseline_us=timer(lambda q=q, s=s: ref.dequant_fp8_block(q, s)),
            )
        )  # fmt: skip
    return report
