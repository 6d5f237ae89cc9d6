"""MoE routing and token (un)permutation vs the plain-torch reference (dsv3.reference.moe), the grouped FP8 GEMMs
(contiguous and masked) vs one batched bf16 matmul over the same groups, and the routed experts (fused_experts) vs a
torch loop over experts with bf16 weights, on DeepSeek-V3 sizes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dsv3
from dsv3.bench.harness import Report, Row, Timer
from dsv3.ops.fused_moe import MASKED_MAX_TOKENS
from dsv3.reference import moe as ref
from dsv3.reference import quant as ref_quant

EXPERTS, TOPK, GROUPS, TOPK_GROUP, SCALE = 256, 8, 8, 4, 2.5  # DeepSeek-V3's router
HIDDEN = 7168
INTERMEDIATE = 2048  # one routed expert's width (gate/up out, down in)


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
    _grouped_gemm_rows(report, timer, device, quick)
    _fused_experts_rows(report, timer, device, quick)
    return report


def _grouped_weights(groups: int, n: int, k: int, device: torch.device):
    """Random FP8 weights of `groups` experts, (e4m3 [G, n, k], scales [G, n/128, k/128]), and their bf16 values."""
    q, s = dsv3.per_block_quant_fp8(torch.randn(groups * n, k, device=device) * 0.02)
    return (q.view(groups, n, k), s.view(groups, n // 128, k // 128)), dsv3.dequant_fp8_block(q, s).view(groups, n, k)


def _grouped_gemm_rows(report: Report, timer: Timer, device: torch.device, quick: bool) -> None:
    """The expert GEMMs alone: gate/up (N=2x2048, K=7168) and down (N=7168, K=2048). Contiguous: prefill-sized groups
    (4096 tokens per expert on a GPU); masked: a decode step's few tokens per local expert (32 experts, 256 rows
    reserved each), where reading the weights is the whole cost."""
    on_gpu = device.type == "cuda"
    shapes = [("gate/up", 2 * INTERMEDIATE, HIDDEN), ("down", HIDDEN, INTERMEDIATE)]
    contiguous_groups, tokens_per_group = (8, 4096) if on_gpu else (2, 64)
    masked_groups, masked_rows = (32, 256) if on_gpu else (4, 32)
    masked_tokens = ([16] if quick else [16, 64]) if on_gpu else [8]
    for name, n, k in shapes:
        b, dense = _grouped_weights(contiguous_groups, n, k, device)
        rows = contiguous_groups * tokens_per_group
        a = dsv3.per_token_group_quant_fp8(torch.randn(rows, k, dtype=torch.bfloat16, device=device))
        groups = torch.arange(contiguous_groups, dtype=torch.int32, device=device)
        m_indices = groups.repeat_interleave(tokens_per_group)
        x = torch.randn(contiguous_groups, tokens_per_group, k, dtype=torch.bfloat16, device=device)
        us, baseline_us = timer.pair(
            lambda a=a, b=b, m=m_indices: dsv3.m_grouped_fp8_gemm_nt_contiguous(a, b, m),
            lambda x=x, w=dense: torch.bmm(x, w.transpose(1, 2)),
        )
        report.add(
            Row(
                "grouped gemm contiguous", f"{name} G={contiguous_groups} M={tokens_per_group} N={n} K={k}",
                device.type, us=us, bytes=b[0].numel() + rows * k + rows * n * 2, flops=2 * rows * n * k,
                peak="fp8_flops", baseline="torch bf16 bmm", baseline_us=baseline_us,
            )
        )  # fmt: skip
        b, dense = _grouped_weights(masked_groups, n, k, device)
        a = dsv3.per_token_group_quant_fp8(torch.randn(masked_groups * masked_rows, k, dtype=torch.bfloat16,
                                                       device=device))  # fmt: skip
        a = (a[0].view(masked_groups, masked_rows, k), a[1].view(masked_groups, masked_rows, k // 128))
        for tokens in masked_tokens:
            counts = torch.full((masked_groups,), tokens, dtype=torch.int32, device=device)
            x = torch.randn(masked_groups, tokens, k, dtype=torch.bfloat16, device=device)
            us, baseline_us = timer.pair(
                lambda a=a, b=b, c=counts, t=tokens: dsv3.m_grouped_fp8_gemm_nt_masked(a, b, c, t),
                lambda x=x, w=dense: torch.bmm(x, w.transpose(1, 2)),
            )
            used = masked_groups * tokens
            report.add(
                Row(
                    "grouped gemm masked", f"{name} G={masked_groups} m={tokens} N={n} K={k}", device.type, us=us,
                    bytes=b[0].numel() + used * k + used * n * 2, flops=2 * used * n * k, peak="fp8_flops",
                    baseline="torch bf16 bmm", baseline_us=baseline_us,
                )
            )  # fmt: skip


def _torch_expert_loop(x, weights, idx, w13, w2):
    """The plain-torch way: every expert with tokens runs its bf16 SwiGLU on its rows; outputs summed in fp32."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in idx.unique().tolist():
        tokens, slots = (idx == expert).nonzero(as_tuple=True)
        h = F.linear(x[tokens], w13[expert])
        y = F.linear(F.silu(h[:, :INTERMEDIATE]) * h[:, INTERMEDIATE:], w2[expert])
        out.index_add_(0, tokens, y.float() * weights[tokens, slots, None])
    return out.to(x.dtype)


def _fused_experts_rows(report: Report, timer: Timer, device: torch.device, quick: bool) -> None:
    """A rank's local experts (8 on the CPU, 32 on a GPU: 256 experts over 32 or 8 ranks) at the real H and I."""
    experts = 32 if device.type == "cuda" else 8
    w13, dense13 = _grouped_weights(experts, 2 * INTERMEDIATE, HIDDEN, device)
    w2, dense2 = _grouped_weights(experts, HIDDEN, INTERMEDIATE, device)
    token_counts = ([16] if quick else [16, 128]) if device.type == "cpu" else ([32, 128] if quick else [32, 128, 4096])
    for t in token_counts:
        # what layout="auto" runs: the single C++ call on the CPU, the masked (decode) or contiguous layout on a GPU
        path = "cpu fused" if device.type == "cpu" else "masked" if t <= MASKED_MAX_TOKENS else "contiguous"
        x = torch.randn(t, HIDDEN, dtype=torch.bfloat16, device=device)
        logits = torch.randn(t, EXPERTS, device=device)
        weights, idx = dsv3.grouped_topk(logits, torch.zeros(EXPERTS, device=device), TOPK, GROUPS, TOPK_GROUP, SCALE)
        idx = (idx % experts).to(torch.int32)  # as if every pick landed on this rank: T x 8 rows over its experts
        rows = idx.numel()
        # folding 256 experts onto a rank's few can route a token to one expert twice: size the masked slabs to fit
        options = {"max_m": int(torch.bincount(idx.flatten().long()).max())} if path == "masked" else {}
        us, baseline_us = timer.pair(
            lambda x=x, w=weights, i=idx, o=options: dsv3.fused_experts(x, w, i, w13, w2, **o),
            lambda x=x, w=weights, i=idx: _torch_expert_loop(x, w, i, dense13, dense2),
        )
        report.add(
            Row(
                "fused_experts", f"T={t} E={experts} top-{TOPK} {path}", device.type, us=us,
                bytes=w13[0].numel() + w2[0].numel() + 2 * rows * HIDDEN * 2,
                flops=2 * rows * 3 * INTERMEDIATE * HIDDEN, peak="fp8_flops",
                baseline="torch expert loop", baseline_us=baseline_us,
            )
        )  # fmt: skip
