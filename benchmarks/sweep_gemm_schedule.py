"""Times every schedule of the CUDA FP8 GEMM (variant x decomposition x splits) on DeepSeek-V3's shapes and prints
the heuristic's choice (dsv3/gemm_schedule.h) next to the fastest, to tune that heuristic on a new GPU:
`python benchmarks/sweep_gemm_schedule.py [--tokens 1 16 64] [--json PATH]`."""

from __future__ import annotations

import argparse
import functools
import json

import torch

import dsv3
from dsv3.bench.gemm import SHAPES
from dsv3.bench.harness import Timer
from dsv3.ops.extension import _C, num_sms
from dsv3.testing import GEMM_KERNEL_VARIANTS, skipped_kernels

VARIANTS = [
    "tile128x128",
    "swapab128x64",
    "pingpong64x128",
    "tile128x128_cluster1x2",
    "tile128x128_overlap",
    "tile128x128_overlap_cluster1x2",
    "decode128x64",
]
DECOMPOSITIONS = ["data_parallel", "split_k", "stream_k"]
SPLITS = (2, 3, 4, 6, 8, 12, 16)
DECODE_SPLITS = (2, 3, 4, 6, 8)  # clusters of up to 8 CTAs


def candidates(m: int, k: int) -> list[tuple[int, int, int]]:
    """(variant, decomposition, splits) codes worth timing: swap-AB only where the tokens fit its 64-wide side,
    ping-pong data-parallel only, the 1x2 clusters from 128 tokens on (they share tiles of the tokens), the
    hand-written overlap kernels (data-parallel only, alone and in 1x2 clusters) from 128 tokens on, the hand-written
    decode kernel (data-parallel or K split in clusters) up to 128 tokens; none of the hand-written kernels that
    DSV3_SKIP_KERNELS names."""
    k_blocks = (k + 127) // 128
    tried = {name: v for name, v in GEMM_KERNEL_VARIANTS.items() if name not in skipped_kernels()}
    out = [(2, 0, 1)]
    if m >= 128:
        out += [(v, 0, 1) for name, v in tried.items() if name != "decode"]
    if m <= 128 and "decode" in tried:
        out += [(tried["decode"], 0, 1)] + [(tried["decode"], 1, s) for s in DECODE_SPLITS if s <= k_blocks]
    for variant in (0, 1) if m <= 64 else (0, 3) if m >= 128 else (0,):
        out += [(variant, 0, 1), (variant, 2, 1)] + [(variant, 1, s) for s in SPLITS if s <= k_blocks]
    return out


def label(schedule: tuple[int, int, int]) -> str:
    variant, decomposition, splits = schedule
    return f"{VARIANTS[variant]}/{DECOMPOSITIONS[decomposition]}" + (f"x{splits}" if splits > 1 else "")


def run_forced(pointers, m, n, k, workspace, sms, stream, forced) -> None:
    _C.cuda.fp8_gemm_nt(*pointers, m, n, k, workspace.data_ptr(), sms, stream, forced)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 128, 512, 4096])
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda")
    sms = num_sms(torch.cuda.current_device())
    timer = Timer(device, warmup=2, reps=15)
    stream = torch.cuda.current_stream().cuda_stream
    results = []
    print(f"{'case':<24} {'heuristic':<32} {'us':>7}   {'fastest':<32} {'us':>7}  heuristic/fastest")
    for n, k in SHAPES:
        qb, sb = dsv3.per_block_quant_fp8(torch.randn(n, k, device=device) * 0.02)
        for m in args.tokens:
            qa, sa = dsv3.per_token_group_quant_fp8(torch.randn(m, k, dtype=torch.bfloat16, device=device))
            out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
            expected = dsv3.fp8_gemm_nt((qa, sa), (qb, sb)).float()
            pointers = (qa.data_ptr(), sa.data_ptr(), qb.data_ptr(), sb.data_ptr(), out.data_ptr())
            times = {}
            for forced in candidates(m, k):
                try:
                    size = _C.cuda.fp8_gemm_workspace_bytes(m, n, k, sms, forced)
                    workspace = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
                    call = functools.partial(run_forced, pointers, m, n, k, workspace, sms, stream, forced)
                    out.fill_(float("nan"))
                    call()
                except ValueError as error:  # a schedule the kernel refuses for this shape: reported, not timed
                    print(f"M={m} N={n} K={k} {label(forced)}: {error}", flush=True)
                    times[forced] = float("nan")
                    continue
                error = (out.float() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)
                # a schedule that computes something else is no candidate (and is reported as such)
                times[forced] = timer(call) if error < 1e-2 else float("nan")
            chosen = _C.fp8_gemm_schedule(m, n, k, sms)
            key = (VARIANTS.index(chosen["variant"]), DECOMPOSITIONS.index(chosen["decomposition"]), chosen["splits"])
            valid = {s: t for s, t in times.items() if t == t}
            best = min(valid, key=valid.get)
            mine = times.get(key, float("nan"))
            print(
                f"{f'M={m} N={n} K={k}':<24} {label(key):<32} {mine:7.2f}   {label(best):<32} {valid[best]:7.2f}  "
                f"{mine / valid[best]:.2f}x"
                + ("" if len(valid) == len(times) else f"  WRONG: {len(times) - len(valid)}"),
                flush=True,
            )
            results.append(
                {"m": m, "n": n, "k": k, "chosen": label(key), "us": {label(s): t for s, t in times.items()}}
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "sms": sms, "cases": results}, f, indent=1)


if __name__ == "__main__":
    main()
