"""MLA decode over a paged latent cache (bf16 and 656-byte FP8 rows) vs the plain-PyTorch reference
(dsv3.reference.mla.mla_decode_with_kvcache) on the same inputs, at DeepSeek-V3's head counts: 128 heads (one GPU)
and 16 heads (8-way tensor parallel). On a GPU the suite waits for the sm_90a kernel and reports nothing yet."""

from __future__ import annotations

import torch

import dsv3
from dsv3.bench.harness import Report, Row, Timer
from dsv3.reference import mla as ref

PAGE = ref.PAGE_SIZE


def _cache(batch: int, seqlen: int, fp8: bool, device: torch.device):
    pages_per_seq = -(-seqlen // PAGE)
    rows = torch.randn(batch * pages_per_seq, PAGE, ref.HEAD_DIM) * 0.5
    if fp8:
        cache = ref.pack_fp8_kv(rows).reshape(batch * pages_per_seq, PAGE, 1, ref.FP8_ROW_BYTES)
    else:
        cache = rows.to(torch.bfloat16).reshape(batch * pages_per_seq, PAGE, 1, ref.HEAD_DIM)
    block_table = torch.randperm(batch * pages_per_seq, dtype=torch.int32).reshape(batch, pages_per_seq)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32)
    return cache.to(device), block_table.to(device), seqlens.to(device)


def run(device: torch.device, quick: bool = False, reps: int | None = None) -> Report:
    report = Report(f"MLA decode on {device.type}")
    if device.type == "cuda":
        return report  # no sm_90a MLA kernel yet
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
