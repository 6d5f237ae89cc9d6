"""The `dsv3` command line: info, check, demo, generate, chat, bench, make-tiny, convert."""

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
    from dsv3.cli_generate import run_demo_generation
    from dsv3.info import build_info

    info = build_info()
    gpu = f", GPU: {info['gpu_name']}" if info["gpu_visible"] else ", no GPU visible"
    archs = ",".join(info["cuda_archs"]) or "none"
    print(f"dsv3 {info['version']}: backends {'+'.join(info['backends'])} (CUDA archs: {archs}){gpu}")
    started = time.perf_counter()
    status = _check(args)
    args.device = _devices(args.device)[-1].type
    status |= run_demo_generation(args)
    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s")
    return status


def _generate(args: argparse.Namespace) -> int:
    from dsv3.cli_generate import run_generate

    try:
        return run_generate(args)
    except ValueError as error:  # bad options or prompts: one line, not a traceback
        raise SystemExit(f"dsv3 generate: {error}") from None


def _chat(args: argparse.Namespace) -> int:
    from dsv3.cli_generate import run_chat

    try:
        return run_chat(args)
    except ValueError as error:
        raise SystemExit(f"dsv3 chat: {error}") from None


def _make_tiny(args: argparse.Namespace) -> int:
    from dsv3.model.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(args.out, seed=args.seed)
    print(f"wrote a tiny random DeepSeek-V3 checkpoint (FP8, sharded, with MTP and tokenizer) to {path}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from dsv3.model.convert import convert_to_bf16

    path = convert_to_bf16(args.source, args.target, progress=True)
    print(f"wrote the BF16 checkpoint to {path}")
    return 0


def _add_generation_commands(commands) -> None:
    from dsv3.cli_generate import add_model_options, add_parallel_options, add_sampling_options

    demo = commands.add_parser("demo", help="self-check, then generate with a tiny checkpoint (made on first use)")
    demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    demo.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    demo.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "fp8"])
    demo.add_argument("--backend", default="kernels", choices=["kernels", "reference"])
    demo.add_argument("--speculative", default=None, choices=["mtp"])
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument(
        "--checkpoint", default=None, help="checkpoint directory (default: $DSV3_CACHE_DIR or ~/.cache/dsv3, /tiny)"
    )
    demo.set_defaults(run=_demo)
    generate = commands.add_parser("generate", help="complete prompts with a checkpoint")
    generate.add_argument("path", help="checkpoint directory")
    generate.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: one batch)")
    add_model_options(generate)
    add_parallel_options(generate)
    add_sampling_options(generate, max_tokens=64)
    generate.set_defaults(run=_generate)
    chat = commands.add_parser("chat", help="chat through the checkpoint's template; one user turn per stdin line")
    chat.add_argument("path", help="checkpoint directory")
    add_model_options(chat)
    add_parallel_options(chat)
    add_sampling_options(chat, max_tokens=128)
    chat.set_defaults(run=_chat)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the suites own their options (`dsv3 bench --help`)
        from dsv3.bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 inference kernels and runtime")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="what the extension was built with, and the GPU it sees").set_defaults(run=_info)
    check = commands.add_parser("check", help="compare every kernel with the reference on this machine")
    check.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    check.set_defaults(run=_check)
    _add_generation_commands(commands)
    commands.add_parser("bench", help="run benchmark suites (see `dsv3 bench --help`)")
    tiny = commands.add_parser("make-tiny", help="write a small random DeepSeek-V3 checkpoint in the official layout")
    tiny.add_argument("out", help="directory to write (created if absent)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_make_tiny)
    convert = commands.add_parser("convert", help="convert a checkpoint (FP8 weights -> BF16)")
    convert.add_argument("--to-bf16", action="store_true", required=True, help="dequantize every FP8 weight")
    convert.add_argument("source")
    convert.add_argument("target")
    convert.set_defaults(run=_convert)
    args = parser.parse_args(argv)
    sys.exit(args.run(args))
