"""Microbenchmarks: one harness (harness.py) and one suite per op family; `dsv3 bench SUITE|all` runs them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv3.bench import e2e, ep, gemm, gemm_kernels, mla, moe, quant
from dsv3.bench.harness import Report, argument_parser, pick_device, write_json

# suite name -> run(device, quick, reps) -> Report
SUITES: dict[str, Callable[[torch.device, bool, int | None], Report]] = {
    "quant": quant.run,
    "gemm": gemm.run,
    "moe": moe.run,
    "mla": mla.run,
    "ep": ep.run,
    "e2e": e2e.run,
    # opt-in kernels not yet timed on a GPU, last in `all` (scripts/gpu_check.sh runs them first, after smoke runs)
    "gemm_kernels": gemm_kernels.run,
    "mla_rows": mla.run_rows_kernel,
}


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("Run dsv3's microbenchmarks")
    parser.add_argument("suite", nargs="+", choices=[*SUITES, "all"], help="suites to run, in this order")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    names = list(dict.fromkeys(name for s in args.suite for name in (SUITES if s == "all" else [s])))
    reports, failed = [], []
    for name in names:
        try:
            report = SUITES[name](device, args.quick, args.reps)
        except Exception as error:  # one broken suite must not cost the others' measurements
            report = Report(f"{name} on {device.type}", error=f"{type(error).__name__}: {error}")
            failed.append(name)
        print(report.table(), flush=True)
        reports.append(report)
        if args.json:  # after every suite, so that a run cut short keeps what it measured
            write_json(args.json, reports)
    if failed:
        raise SystemExit(f"benchmark suites failed: {', '.join(failed)}")
