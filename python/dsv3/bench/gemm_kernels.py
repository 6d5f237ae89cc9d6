"""The hand-written FP8 GEMM kernels (DSV3_FP8_GEMM_KERNEL=overlap, =overlap_cluster, =decode) against the kernels
the library picks, in the same run, on the issue targets' shapes: for the overlap kernels the dense GEMM at M=4096
(N=7168, K=16384) and the MoE expert GEMMs, contiguous (8 experts x 4096 tokens) and masked (32 experts x 64
tokens); for the decode kernel the dense GEMM at 1 and 64 tokens (the largest and the smallest DeepSeek-V3 weights),
fp8_linear (quantization and GEMM) at the same sizes, and the masked expert GEMMs. `x base` = the library's time /
the hand-written kernel's. GPU only; registered after the other suites, as it runs kernels that have not yet been
timed on a GPU, and it leaves out those DSV3_SKIP_KERNELS names."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

import dsv3
from dsv3.bench.harness import Report, Row, Timer
from dsv3.bench.moe import HIDDEN, INTERMEDIATE, _grouped_weights
from dsv3.testing import skipped_kernels

Case = tuple[str, str, Callable[[], object], int, int]  # (op, case, call, bytes, flops)
OVERLAP = ("overlap", "overlap_cluster")


def _dense(m: int, n: int, k: int, device: torch.device) -> Case:
    a = dsv3.per_token_group_quant_fp8(torch.randn(m, k, dtype=torch.bfloat16, device=device))
    b = dsv3.per_block_quant_fp8(torch.randn(n, k, device=device) * 0.02)
    return ("fp8_gemm_nt", f"M={m} N={n} K={k}", lambda: dsv3.fp8_gemm_nt(a, b), m * k + n * k + 2 * m * n,
            2 * m * n * k)  # fmt: skip


def _linear(m: int, n: int, k: int, device: torch.device) -> Case:
    """fp8_linear: quantization, then the GEMM (on the decode kernel, launched to overlap the quantization)."""
    x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    b = dsv3.per_block_quant_fp8(torch.randn(n, k, device=device) * 0.02)
    return ("fp8_linear", f"M={m} N={n} K={k}", lambda: dsv3.fp8_linear(x, b), 2 * m * k + n * k + 2 * m * n,
            2 * m * n * k)  # fmt: skip


def _cases(device: torch.device, quick: bool) -> list[tuple[Case, tuple[str, ...]]]:
    """Each timed shape with the hand-written kernels it is timed on."""
    cases = [(_dense(4096, 7168, 16384, device), OVERLAP)]
    decode_shapes = [(7168, 16384)] if quick else [(7168, 16384), (576, 7168), (24576, 1536)]
    cases += [(_dense(m, n, k, device), ("decode",)) for n, k in decode_shapes for m in (1, 64)]
    cases += [(_linear(m, n, k, device), ("decode",)) for n, k in decode_shapes[:2] for m in (1, 64)]
    shapes = [("gate/up", 2 * INTERMEDIATE, HIDDEN)] if quick else [("gate/up", 2 * INTERMEDIATE, HIDDEN),
                                                                    ("down", HIDDEN, INTERMEDIATE)]  # fmt: skip
    for name, n, k in shapes:
        groups, tokens = 8, 4096
        weights, _ = _grouped_weights(groups, n, k, device)
        rows = groups * tokens
        x = dsv3.per_token_group_quant_fp8(torch.randn(rows, k, dtype=torch.bfloat16, device=device))
        m_indices = torch.arange(groups, dtype=torch.int32, device=device).repeat_interleave(tokens)
        cases.append((("grouped gemm contiguous", f"{name} G={groups} M={tokens} N={n} K={k}",
                       lambda x=x, w=weights, i=m_indices: dsv3.m_grouped_fp8_gemm_nt_contiguous(x, w, i),
                       weights[0].numel() + rows * k + rows * n * 2, 2 * rows * n * k), OVERLAP))  # fmt: skip
        groups, slab, tokens = 32, 256, 64
        weights, _ = _grouped_weights(groups, n, k, device)
        q, s = dsv3.per_token_group_quant_fp8(torch.randn(groups * slab, k, dtype=torch.bfloat16, device=device))
        x = (q.view(groups, slab, k), s.view(groups, slab, k // 128))
        counts = torch.full((groups,), tokens, dtype=torch.int32, device=device)
        used = groups * tokens
        masked = ("grouped gemm masked", f"{name} G={groups} m={tokens} N={n} K={k}",
                  lambda x=x, w=weights, c=counts, t=tokens: dsv3.m_grouped_fp8_gemm_nt_masked(x, w, c, t),
                  weights[0].numel() + used * k + used * n * 2, 2 * used * n * k)  # fmt: skip
        cases.append((masked, (*OVERLAP, "decode")))
    return cases


def run(device: torch.device, quick: bool = False, reps: int | None = None) -> Report:
    report = Report(f"FP8 GEMMs on the hand-written kernels vs the library's kernels, on {device.type}")
    if device.type != "cuda":
        return report  # kernels of the sm_90a build only
    timer = Timer(device, warmup=3, reps=reps or 20)
    for (op, case, call, moved, flops), kernels in _cases(device, quick):
        names = [name for name in kernels if name not in skipped_kernels()]
        if not names:
            continue
        default_us = timer(call)
        for name in names:
            os.environ["DSV3_FP8_GEMM_KERNEL"] = name
            try:
                us = timer(call)
            finally:
                del os.environ["DSV3_FP8_GEMM_KERNEL"]
            report.add(Row(f"{op} {name}", case, device.type, us=us, bytes=moved, flops=flops, peak="fp8_flops",
                           baseline="library's kernel", baseline_us=default_us))  # fmt: skip
    return report
