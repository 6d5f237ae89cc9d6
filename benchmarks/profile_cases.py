"""One call of each kernel whose GPU target is open, inside an NVTX range named "profile", for Nsight Compute:

    ncu --nvtx --nvtx-include "profile/" --section SpeedOfLight --section WarpStateStats -o build/profiles \\
        python benchmarks/profile_cases.py

(scripts/gpu_check.sh runs this when ncu is on the PATH). The cases are the benchmark's target rows: MLA decode at
h=16 b=128 seq 4096 (bf16 and FP8 cache), h=128 (also with DSV3_MLA_KERNEL=rows), and b=4 seq 32768 (many splits to
combine), the decode-sized and the large FP8 GEMM (the large one also forced onto the 1x2-cluster and the two overlap
variants, the decode-sized one onto the decode kernel), and the masked grouped GEMM at 64 tokens per expert (also on
the decode kernel). Each case prints its name before its range, so the
profiled kernels, in launch order, map to the printed cases. The untried kernels run last, so that an error stops no
other case, and kernels named in DSV3_SKIP_KERNELS (failed smoke runs) not at all."""

from __future__ import annotations

import contextlib
import os

import torch

import dsv3
from dsv3.bench.mla import _cache
from dsv3.testing import GEMM_KERNEL_VARIANTS, skipped_kernels


@contextlib.contextmanager
def _profiled(case: str):
    print(case, flush=True)
    with torch.cuda.nvtx.range("profile"):
        yield


def _mla(batch: int, heads: int, fp8: bool, seqlen: int = 4096, kernel: str | None = None) -> None:
    cache, block_table, seqlens = _cache(batch, seqlen, fp8, torch.device("cuda"))
    q = (torch.randn(batch, 1, heads, 576, device="cuda") * 0.1).bfloat16()
    metadata, num_splits = dsv3.get_mla_metadata(seqlens, heads, 1)
    if kernel:
        os.environ["DSV3_MLA_KERNEL"] = kernel
    name = f"mla b={batch} seq={seqlen} h={heads} {'fp8' if fp8 else 'bf16'}" + (f" {kernel} kernel" if kernel else "")
    with _profiled(name):
        dsv3.mla_decode_with_kvcache(q, cache, block_table, seqlens, 512, metadata, num_splits, causal=True)
    os.environ.pop("DSV3_MLA_KERNEL", None)


def _gemm(m: int, n: int, k: int, forced: tuple[int, int, int] | None = None) -> None:
    """The heuristic's schedule, or a forced (variant, decomposition, splits) one (codes of dsv3/gemm_schedule.h)."""
    from dsv3.ops.extension import _C, num_sms

    a = dsv3.per_token_group_quant_fp8(torch.randn(m, k, device="cuda"))
    b = dsv3.per_block_quant_fp8(torch.randn(n, k, device="cuda") * 0.02)
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    sms = num_sms(torch.cuda.current_device())
    workspace = torch.empty(max(_C.cuda.fp8_gemm_workspace_bytes(m, n, k, sms, forced), 1), dtype=torch.uint8,
                            device="cuda")  # fmt: skip
    with _profiled(f"fp8_gemm_nt M={m} N={n} K={k}" + (f" schedule {forced}" if forced else "")):
        _C.cuda.fp8_gemm_nt(a[0].data_ptr(), a[1].data_ptr(), b[0].data_ptr(), b[1].data_ptr(), out.data_ptr(), m, n,
                            k, workspace.data_ptr(), sms, torch.cuda.current_stream().cuda_stream, forced)  # fmt: skip


def _masked(groups: int, tokens: int, n: int, k: int) -> None:
    q, s = dsv3.per_token_group_quant_fp8(torch.randn(groups * 256, k, device="cuda"))
    a = (q.view(groups, 256, k), s.view(groups, 256, k // 128))
    wq, ws = dsv3.per_block_quant_fp8(torch.randn(groups * n, k, device="cuda") * 0.02)
    b = (wq.view(groups, n, k), ws.view(groups, n // 128, k // 128))
    counts = torch.full((groups,), tokens, dtype=torch.int32, device="cuda")
    with _profiled(f"grouped masked G={groups} m={tokens} N={n} K={k}"):
        dsv3.m_grouped_fp8_gemm_nt_masked(a, b, counts, tokens)


def main() -> None:
    _mla(128, 16, fp8=False)
    _mla(128, 16, fp8=True)
    _mla(64, 128, fp8=False)
    _mla(4, 16, fp8=False, seqlen=32768)  # ~33 splits a sequence: the decode kernel and the combine apart
    _gemm(64, 7168, 16384)
    _gemm(4096, 7168, 16384)
    _masked(32, 64, 4096, 7168)
    _gemm(4096, 7168, 16384, forced=(3, 0, 1))  # 1x2 clusters (TMA multicast of a)
    tried = {name: v for name, v in GEMM_KERNEL_VARIANTS.items() if name not in skipped_kernels()}
    for name in ("overlap", "overlap_cluster"):  # the hand-written 128x128 kernel, alone and in 1x2 clusters
        if name in tried:
            _gemm(4096, 7168, 16384, forced=(tried[name], 0, 1))
    if "decode" in tried:  # the hand-written decode kernel, K split over clusters of 4 (its choice here)
        _gemm(64, 7168, 16384, forced=(tried["decode"], 1, 4))
        os.environ["DSV3_FP8_GEMM_KERNEL"] = "decode"
        _masked(32, 64, 4096, 7168)
        del os.environ["DSV3_FP8_GEMM_KERNEL"]
    if "mla_rows" not in skipped_kernels():
        _mla(64, 128, fp8=False, kernel="rows")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
