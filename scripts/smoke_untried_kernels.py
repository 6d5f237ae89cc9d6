"""One small, checked call of each CUDA kernel not yet proven on a GPU, by name, so that scripts/gpu_check.sh can
run each in a process of its own under a time limit and leave out (DSV3_SKIP_KERNELS) the tests, sweep rows,
profiles and benchmarks of any that fails or hangs, instead of losing whole stages to it:

    python scripts/smoke_untried_kernels.py --list      # the names
    python scripts/smoke_untried_kernels.py NAME        # exit status 0: ran and matched the reference
"""

from __future__ import annotations

import os
import sys

import torch

import dsv3
from dsv3.reference import gemm as gemm_ref
from dsv3.testing import GEMM_KERNEL_VARIANTS, calc_diff


def _gemm(name: str) -> None:
    """Dense: partial tiles, an odd K-block count, several waves of the persistent grid (M=4096 N=7168) and decode
    sizes (the decode kernel splits K over clusters of 4 and 8 CTAs there). Grouped: contiguous groups of 130, 0, 3
    and 260 rows, and masked slabs of 200 rows holding 200, 0, 129 and 7."""
    os.environ["DSV3_FP8_GEMM_KERNEL"] = name
    for m, n, k in [(300, 1536, 640), (4096, 7168, 2048), (64, 7168, 2048), (1, 576, 7168)]:
        a = dsv3.per_token_group_quant_fp8(torch.randn(m, k, device="cuda"))
        b = dsv3.per_block_quant_fp8(torch.randn(n, k, device="cuda") * 0.02)
        diff = calc_diff(dsv3.fp8_gemm_nt(a, b), gemm_ref.fp8_gemm_nt(a, b))
        torch.cuda.synchronize()
        assert diff <= 1e-5, f"{name}: M={m} N={n} K={k} calc_diff {diff:.3e}"
    groups, n, k = 4, 384, 512
    qw, sw = dsv3.per_block_quant_fp8(torch.randn(groups * n, k, device="cuda") * 0.05)
    b = (qw.view(groups, n, k), sw.view(groups, n // 128, k // 128))
    m_indices = torch.tensor([0] * 130 + [2] * 3 + [-1] * 5 + [3] * 260, dtype=torch.int32, device="cuda")
    a = dsv3.per_token_group_quant_fp8(torch.randn(len(m_indices), k, device="cuda"))
    out = dsv3.m_grouped_fp8_gemm_nt_contiguous(a, b, m_indices)
    diff = calc_diff(out, gemm_ref.m_grouped_fp8_gemm_nt_contiguous(a, b, m_indices))
    assert diff <= 1e-5 and bool((out[m_indices == -1] == 0).all()), f"{name}: contiguous calc_diff {diff:.3e}"
    masked_m = torch.tensor([200, 0, 129, 7], dtype=torch.int32, device="cuda")
    a = dsv3.per_token_group_quant_fp8(torch.randn(groups, 200, k, device="cuda"))
    out = torch.full((groups, 200, n), 7.0, dtype=torch.bfloat16, device="cuda")
    dsv3.m_grouped_fp8_gemm_nt_masked(a, b, masked_m, 64, out=out)  # the decode kernel takes up to 64 expected rows
    expected = gemm_ref.m_grouped_fp8_gemm_nt_masked(a, b, masked_m)
    for g, rows in enumerate(masked_m.tolist()):
        diff = calc_diff(out[g, :rows], expected[g, :rows])
        assert diff <= 1e-5 and bool((out[g, rows:] == 7.0).all()), f"{name}: masked group {g} calc_diff {diff:.3e}"
    torch.cuda.synchronize()


def _mla_rows() -> None:
    """DSV3_MLA_KERNEL=rows against the default kernel on 128 heads, mixed lengths."""
    heads, seqlens = 128, torch.tensor([0, 1, 64, 1000], dtype=torch.int32, device="cuda")
    pages = (int(seqlens.max()) + 63) // 64
    cache = (torch.randn(len(seqlens) * pages, 64, 1, 576, device="cuda") * 0.5).bfloat16()
    block_table = torch.arange(len(seqlens) * pages, dtype=torch.int32, device="cuda").view(len(seqlens), pages)
    q = (torch.randn(len(seqlens), 1, heads, 576, device="cuda") * 0.1).bfloat16()
    metadata, num_splits = dsv3.get_mla_metadata(seqlens, heads, 1)
    default = dsv3.mla_decode_with_kvcache(q, cache, block_table, seqlens, 512, metadata, num_splits)
    os.environ["DSV3_MLA_KERNEL"] = "rows"
    rows = dsv3.mla_decode_with_kvcache(q, cache, block_table, seqlens, 512, metadata, num_splits)
    torch.cuda.synchronize()
    diff = calc_diff(rows[0], default[0])
    assert diff <= 1e-5, f"mla_rows: calc_diff {diff:.3e} against the default kernel"


CASES = {**{name: (lambda name=name: _gemm(name)) for name in GEMM_KERNEL_VARIANTS}, "mla_rows": _mla_rows}


def main() -> None:
    if sys.argv[1:] == ["--list"]:
        print(" ".join(CASES))
        return
    (name,) = sys.argv[1:]
    torch.manual_seed(0)
    CASES[name]()
    print(f"{name}: ok")


if __name__ == "__main__":
    main()
