"""MoE routing and token (un)permutation vs the plain-torch reference (dsv3.reference.moe) on DeepSeek-V3 sizes."""

from __future__ import annotations

import torch

import dsv3
from dsv3.bench.harness import Report, Row, Timer
from dsv3.reference import moe as ref
from dsv3.reference import quant as ref_quant

EXPERTS, TOPK, GROUPS, TOPK_GROUP, SCALE = 256, 8, 8, 4, 2.5  # DeepSeek-V3's router
HIDDEN = 7168


def _reference_permute_quant(x: torch.Tensor, layout: ref.ContiguousLayout) -> tuple[torch.Tensor, torch.Tensor]:
    return ref_quant.per_token_group_quant_fp8(ref.permute_tokens(x, layout))


def run(device: torch.device, quick: bool = False, reps: int | None = None) -> Report:
    timer = Timer(device, warmup=2, reps=reps or (5 if quick else 20))
    report = Report(f"MoE routing and token layout on {device.type}")
    for t in [1, 128] if quick else [1, 128, 4096]:
        logits = torch.randn(t, EXPERTS, dtype=torch.bfloat16, device=device)
        bias = torch.randn(EXPERTS, device=device) * 0.1
        route_args = (logits, bias, TOPK, GROUPS, TOPK_GROUP, SCALE)
        report.add(
            Row(
                "grouped_topk", f"T={t} E={EXPERTS} top-{TOPK}", device.type,
                us=timer(lambda a=route_args: dsv3.grouped_topk(*a)), bytes=logits.numel() * 2 + t * TOPK * 8,
                baseline="reference", baseline_us=timer(lambda a=route_args: ref.grouped_topk(*a)),
            )
        )  # fmt: skip
        weights, idx = dsv3.grouped_topk(*route_args)
        report.add(
            Row(
                "moe_contiguous_layout", f"T={t} k={TOPK}", device.type,
                us=timer(lambda idx=idx: dsv3.moe_contiguous_layout(idx, EXPERTS)), bytes=idx.numel() * 4,
                baseline="reference", baseline_us=timer(lambda idx=idx: ref.moe_contiguous_layout(idx, EXPERTS)),
            )
        )  # fmt: skip
        layout = dsv3.moe_contiguous_layout(idx, EXPERTS)
        ref_layout = ref.moe_contiguous_layout(idx, EXPERTS)
        x = torch.randn(t, HIDDEN, dtype=torch.bfloat16, device=device)
        rows = layout.m_indices.shape[0]
        real = idx.numel()  # rows that carry a token; padding rows are written as zeros
        report.add(
            Row(
                "permute_tokens", f"T={t} H={HIDDEN} rows={rows}", device.type,
                us=timer(lambda x=x, la=layout: dsv3.permute_tokens(x, la)), bytes=(real + rows) * HIDDEN * 2,
                baseline="reference", baseline_us=timer(lambda x=x, la=ref_layout: ref.permute_tokens(x, la)),
            )
        )  # fmt: skip
        report.add(
            Row(
                "permute_tokens+fp8", f"T={t} H={HIDDEN} rows={rows}", device.type,
                us=timer(lambda x=x, la=layout: dsv3.permute_tokens(x, la, quantize=True)),
                bytes=real * HIDDEN * 2 + rows * HIDDEN * (1 + 4 / 128),
                baseline="reference", baseline_us=timer(lambda x=x, la=ref_layout: _reference_permute_quant(x, la)),
            )
        )  # fmt: skip
        y = torch.randn(rows, HIDDEN, dtype=torch.bfloat16, device=device)
        y_ref = y[: ref_layout.num_rows]
        report.add(
            Row(
                "unpermute_tokens", f"T={t} H={HIDDEN} top-{TOPK}", device.type,
                us=timer(lambda y=y, la=layout, w=weights: dsv3.unpermute_tokens(y, la, w)),
                bytes=(real + t) * HIDDEN * 2, flops=2 * real * HIDDEN, baseline="reference",
                baseline_us=timer(lambda y=y_ref, la=ref_layout, w=weights: ref.unpermute_tokens(y, la, w)),
            )
        )  # fmt: skip
    return report
