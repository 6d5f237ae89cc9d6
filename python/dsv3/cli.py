"""The `dsv3` command line: info, check, demo, bench."""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _devices(choice: str) -> list[torch.device]:
    from dsv3.ops.extension import cuda_compiled

    if choice == "cpu":
        return [torch.device("cpu")]
    gpu = torch.cuda.is_available() and cuda_compiled()
    if choice == "cuda":
        if not gpu:
            raise SystemExit("--device cuda: no usable GPU (torch sees none, or dsv3 was built without CUDA kernels)")
        return [torch.device("cuda")]
    return [torch.device("cpu")] + ([torch.device("cuda")] if gpu else [])


def _info(args: argparse.Namespace) -> int:
    from dsv3.info import build_info, format_build_info

    print(format_build_info(build_info()))
    return 0


def _check(args: argparse.Namespace) -> int:
    from dsv3.selfcheck import run_self_check

    failures = 0
    for device in _devices(args.device):
        for result in run_self_check(device):
            status = "ok" if result.passed else "FAILED"
            print(f"  {result.device:<5} {result.name:<28} {status} {result.detail}")
            failures += not result.passed
    print(f"self-check: {'all kernels match the reference' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


def _demo(args: argparse.Namespace) -> int:
    from dsv3.bench import gemm, quant
    from dsv3.info import build_info

    info = build_info()
    gpu = f", GPU: {info['gpu_name']}" if info["gpu_visible"] else ", no GPU visible"
    archs = ",".join(info["cuda_archs"]) or "none"
    print(f"dsv3 {info['version']}: backends {'+'.join(info['backends'])} (CUDA archs: {archs}){gpu}")
    started = time.perf_counter()
    status = _check(args)
    device = _devices(args.device)[-1]
    print()
    print(quant.run(device, quick=True).table())
    print(gemm.run(device, quick=True).table())
    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s")
    return status


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the suites own their options (`dsv3 bench --help`)
        from dsv3.bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 inference kernels and runtime")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="what the extension was built with, and the GPU it sees").set_defaults(run=_info)
    for name, run, text in (
        ("check", _check, "compare every kernel with the reference on this machine"),
        ("demo", _demo, "self-check plus a short benchmark"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        command.set_defaults(run=run)
    commands.add_parser("bench", help="run benchmark suites (see `dsv3 bench --help`)")
    args = parser.parse_args(argv)
    sys.exit(args.run(args))
