"""MLA decode over a paged latent cache (bf16 and 656-byte FP8 rows) vs the plain-PyTorch reference
(dsv3.reference.mla.mla_decode_with_kvcache) on the same inputs, at DeepSeek-V3's head counts: 128 heads (one GPU)
and 16 heads (8-way tensor parallel).

On a GPU the cases are decode batches of the sizes the targets are set for: 16 heads at batch 128 and 4096 tokens is
memory bound (the % HBM column is the one that matters, target 90%), 128 heads is compute bound (% of the BF16 peak,
target 70%). Each case runs with the bf16 and the FP8 cache; `fp8_speedup` is the bf16 time over the FP8 time of
the same case (target 1.6 when memory bound). Bytes count the cache rows read, q and out; FLOPs 2 * h * s_q * seqlen
* (576 + 512) a sequence.

`run_rows_kernel` (suite `mla_rows`, run last by `dsv3 bench all`) times the cases of 64 or more query rows a
sequence with DSV3_MLA_KERNEL=rows, the opt-in kernel with the query rows on the MMAs' M side, against the default
kernel in the same run (the `x base` column: the default's time over its time)."""

from __future__ import annotations

import os

import torch

import dsv3
from dsv3.bench.harness import Report, Row, Timer, memory_roof_rows
from dsv3.reference import mla as ref
from dsv3.testing import skipped_kernels

PAGE = ref.PAGE_SIZE


def _cache(batch: int, seqlen: int, fp8: bool, device: torch.device):
    pages_per_seq = -(-seqlen // PAGE)
    rows = torch.randn(batch * pages_per_seq, PAGE, ref.HEAD_DIM, device=device) * 0.5  # made where it is used
    if fp8:
        cache = ref.pack_fp8_kv(rows).reshape(batch * pages_per_seq, PAGE, 1, ref.FP8_ROW_BYTES)
    else:
        cache = rows.to(torch.bfloat16).reshape(batch * pages_per_seq, PAGE, 1, ref.HEAD_DIM)
    block_table = torch.randperm(batch * pages_per_seq, dtype=torch.int32).reshape(batch, pages_per_seq)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32)
    return cache, block_table.to(device), seqlens.to(device)


def _run_gpu(device: torch.device, quick: bool, reps: int | None) -> Report:
    report = Report(f"MLA decode on {device.type}")
    timer = Timer(device, warmup=3, reps=reps or 20)
    baseline_timer = Timer(device, warmup=1, reps=3)  # the reference is slow; few repetitions say enough
    for row in memory_roof_rows(timer, device):
        report.add(row)
    # (batch, seqlen, heads, s_q)
    cases = [(128, 4096, 16, 1)] if quick else [(128, 4096, 16, 1), (64, 4096, 16, 2), (64, 4096, 128, 1),
                                                (32, 4096, 128, 2), (4, 32768, 16, 1)]  # fmt: skip
    for batch, seqlen, heads, s_q in cases:
        times = {}
        for fp8 in (False, True):
            cache, block_table, seqlens = _cache(batch, seqlen, fp8, device)
            q = (torch.randn(batch, s_q, heads, ref.HEAD_DIM, device=device) * 0.1).to(torch.bfloat16)
            metadata, num_splits = dsv3.get_mla_metadata(seqlens, s_q * heads, 1)
            row_bytes = ref.FP8_ROW_BYTES if fp8 else 2 * ref.HEAD_DIM
            moved = batch * seqlen * row_bytes + q.numel() * 2 + batch * s_q * heads * ref.LATENT_DIM * 2
            us = timer(lambda q=q, c=cache, t=block_table, s=seqlens, m=metadata, n=num_splits:
                       dsv3.mla_decode_with_kvcache(q, c, t, s, 512, m, n, causal=True))  # fmt: skip
            baseline_us = None
            if batch * seqlen * heads * s_q <= (1 << 24):  # the fp32 reference's memory grows with this product
                baseline_us = baseline_timer(lambda q=q, c=cache, t=block_table, s=seqlens:
                                             ref.mla_decode_with_kvcache(q, c, t, s, causal=True))  # fmt: skip
            times[fp8] = us
            report.add(
                Row(
                    "mla_decode_with_kvcache", f"b={batch} seq={seqlen} h={heads} s_q={s_q} {'fp8' if fp8 else 'bf16'}",
                    device.type, us=us, bytes=moved,
                    flops=2 * batch * heads * s_q * seqlen * (ref.HEAD_DIM + ref.LATENT_DIM), peak="bf16_flops",
                    baseline="reference" if baseline_us else None, baseline_us=baseline_us,
                    extra={"fp8_speedup": times[False] / us} if fp8 else {},
                )
            )  # fmt: skip
            del cache, block_table, q
        torch.cuda.empty_cache()
    return report


def run_rows_kernel(device: torch.device, quick: bool = False, reps: int | None = None) -> Report:
    report = Report(f"MLA decode, DSV3_MLA_KERNEL=rows vs the default kernel, on {device.type}")
    if device.type != "cuda":
        return report  # a kernel of the sm_90a build only
    if "mla_rows" in skipped_kernels():
        report.title += ": left out, DSV3_SKIP_KERNELS names mla_rows (its smoke run failed)"
        return report
    timer = Timer(device, warmup=3, reps=reps or 20)
    for batch, seqlen, heads, s_q in [(64, 4096, 128, 1)] if quick else [(64, 4096, 128, 1), (32, 4096, 128, 2)]:
        cache, block_table, seqlens = _cache(batch, seqlen, False, device)
        q = (torch.randn(batch, s_q, heads, ref.HEAD_DIM, device=device) * 0.1).to(torch.bfloat16)
        metadata, num_splits = dsv3.get_mla_metadata(seqlens, s_q * heads, 1)

        def decode(q=q, c=cache, t=block_table, s=seqlens, m=metadata, n=num_splits):
            return dsv3.mla_decode_with_kvcache(q, c, t, s, 512, m, n, causal=True)

        default_us = timer(decode)
        os.environ["DSV3_MLA_KERNEL"] = "rows"
        try:
            us = timer(decode)
        finally:
            del os.environ["DSV3_MLA_KERNEL"]
        report.add(
            Row(
                "mla_decode_with_kvcache", f"b={batch} seq={seqlen} h={heads} s_q={s_q} bf16 rows", device.type, us=us,
                bytes=batch * seqlen * 2 * ref.HEAD_DIM + q.numel() * 2 + batch * s_q * heads * ref.LATENT_DIM * 2,
                flops=2 * batch * heads * s_q * seqlen * (ref.HEAD_DIM + ref.LATENT_DIM), peak="bf16_flops",
                baseline="default kernel", baseline_us=default_us,
            )
        )  # fmt: skip
        del cache, block_table, q
    return report


def run(device: torch.device, quick: bool = False, reps: int | None = None) -> Report:
    if device.type == "cuda":
        return _run_gpu(device, quick, reps)
    report = Report(f"MLA decode on {device.type}")
    timer = Timer(device, warmup=1, reps=reps or 3)
    cases = [(4, 1024, 16)] if quick else [(4, 1024, 16), (16, 1024, 16), (4, 1024, 128), (1, 8192, 16)]
    for batch, seqlen, heads in cases:
        for fp8 in (False, True):
            cache, block_table, seqlens = _cache(batch, seqlen, fp8, device)
            q = (torch.randn(batch, 1, heads, ref.HEAD_DIM) * 0.1).to(torch.bfloat16).to(device)
            metadata, num_splits = dsv3.get_mla_metadata(seqlens, heads, 1)
            row_bytes = ref.FP8_ROW_BYTES if fp8 else 2 * ref.HEAD_DIM
            moved = batch * seqlen * row_bytes + q.numel() * 2 + batch * heads * ref.LATENT_DIM * 2
            report.add(
                Row(
                    "mla_decode_with_kvcache", f"b={batch} seq={seqlen} h={heads} {'fp8' if fp8 else 'bf16'}",
                    device.type,
                    us=timer(lambda q=q, c=cache, t=block_table, s=seqlens, m=metadata, n=num_splits:
                             dsv3.mla_decode_with_kvcache(q, c, t, s, 512, m, n)),
                    bytes=moved, flops=2 * batch * heads * seqlen * (ref.HEAD_DIM + ref.LATENT_DIM),
                    peak="bf16_flops", baseline="reference",
                    baseline_us=timer(lambda q=q, c=cache, t=block_table, s=seqlens:
                                      ref.mla_decode_with_kvcache(q, c, t, s)),
                )
            )  # fmt: skip
    return report
