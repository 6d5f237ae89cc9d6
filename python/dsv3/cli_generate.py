"""`dsv3 generate`, `dsv3 chat` and the generation half of `dsv3 demo`: options, and printing results and timings."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "fp8"])
    parser.add_argument("--backend", default="kernels", choices=["kernels", "reference"])
    parser.add_argument("--speculative", default=None, choices=["mtp"], help="draft with the MTP module")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="replay decode steps from CUDA graphs (cuda, bfloat16)"
    )
    parser.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="KV cache size (default: see --gpu-memory-utilization; 0.25 on the CPU)",
    )
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9,
        help="share of the GPU's memory for the model and the KV cache together (default 0.9)",
    )  # fmt: skip
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="tokens a sequence may hold (default: the model's)"
    )


def add_parallel_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel ranks for attention and dense layers (under torchrun)"
    )
    parser.add_argument(
        "--ep", type=int, default=1, help="expert-parallel ranks for the routed experts (under torchrun)"
    )


def add_sampling_options(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def load(args: argparse.Namespace, path: str | Path):
    from dsv3.runtime import LLM

    return LLM(
        path,
        device=args.device,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        speculative=args.speculative,
        backend=args.backend,
        tensor_parallel_size=getattr(args, "tp", 1),
        expert_parallel_size=getattr(args, "ep", 1),
        cuda_graphs=getattr(args, "cuda_graphs", False),
        kv_cache_bytes=None if getattr(args, "kv_cache_gib", None) is None else int(args.kv_cache_gib * 2**30),
        gpu_memory_utilization=getattr(args, "gpu_memory_utilization", 0.9),
        max_model_len=getattr(args, "max_model_len", None),
    )


def _prints() -> bool:
    """Under torchrun every rank generates the same text; only rank 0 prints it."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def sampling_params(args: argparse.Namespace):
    from dsv3.runtime import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def format_stats(llm) -> str:
    """Time per phase and throughput of the last generate call."""
    s = llm.stats
    prefill_rate = s.prefill_tokens / s.prefill_s if s.prefill_s else 0.0
    decode_rate = s.decode_tokens / s.decode_s if s.decode_s else 0.0
    line = (
        f"load {llm.load_s:.2f} s | prefill {s.prefill_tokens} tokens in {s.prefill_s:.2f} s ({prefill_rate:.0f} tok/s)"
        f" | decode {s.decode_tokens} tokens in {s.decode_s:.2f} s ({decode_rate:.1f} tok/s)"
    )
    if s.reused_tokens:
        line += f" | {s.reused_tokens} prompt tokens from the prefix cache"
    if s.acceptance_rate is not None:
        line += f" | MTP acceptance {s.acceptance_rate:.2f}"
    return line


def _print_stream(pieces) -> tuple[str, int, str]:
    """Prints one request's text as its pieces arrive (on the printing rank); returns its text, token count and
    finish reason."""
    text, tokens, reason = "", 0, ""
    for piece in pieces:
        text += piece.text
        tokens += len(piece.token_ids)
        reason = piece.finish_reason  # set on the last piece
        if _prints():
            print(piece.text, end="\n" if piece.finished else "", flush=True)
    return text, tokens, reason


def run_generate(args: argparse.Namespace) -> int:
    """Each prompt's completion, then the run's timings; a single prompt's completion is printed while it is
    generated."""
    params = sampling_params(args)
    llm = load(args, args.path)
    if len(args.prompt) == 1:
        if _prints():
            print(f"--- prompt 0: {args.prompt[0]!r}")
        _, tokens, reason = _print_stream(llm.stream(args.prompt, params))
        if _prints():
            print(f"({tokens} tokens, {reason})")
    else:
        for output in llm.generate(args.prompt, params):
            if _prints():
                print(f"--- prompt {output.index}: {output.prompt!r}")
                print(output.text)
                print(f"({output.num_generated_tokens} tokens, {output.finish_reason})")
    if _prints():
        print(format_stats(llm))
    return 0


def _read_turn(interactive: bool) -> str:
    """The next stdin line ('' at the end). Under torchrun rank 0 reads it and every rank receives it, so all ranks
    run the same turns in step."""
    import torch.distributed as dist

    line = None
    if _prints():
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def run_chat(args: argparse.Namespace) -> int:
    """One conversation: each stdin line is a user turn; replies go to stdout as they are generated. Works with piped
    input, and under torchrun with --tp/--ep (rank 0 reads the turns and prints the replies)."""
    params = sampling_params(args)
    llm = load(args, args.path)
    interactive = sys.stdin.isatty()
    messages: list[dict[str, str]] = []
    while True:
        line = _read_turn(interactive)
        if not line:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        if _prints():
            print("assistant: ", end="", flush=True)
        reply, _, _ = _print_stream(llm.stream_chat(messages, params))
        messages.append({"role": "assistant", "content": reply})
    if messages and _prints():
        print(format_stats(llm))
    return 0


DEMO_PROMPTS = ["DeepSeek-V3 is a mixture-of-experts", "The quick brown fox", "Once upon a time"]


def demo_checkpoint(directory: str | None) -> Path:
    """The tiny checkpoint the demo runs, written on first use into the cache directory."""
    from dsv3.model.tiny import make_tiny_checkpoint

    default = Path(os.environ.get("DSV3_CACHE_DIR", Path.home() / ".cache" / "dsv3")) / "tiny"
    path = Path(directory) if directory else default
    if not (path / "config.json").is_file():
        print(f"writing the tiny checkpoint to {path}")
        make_tiny_checkpoint(path)
    return path


def run_demo_generation(args: argparse.Namespace) -> int:
    from dsv3.runtime import SamplingParams

    path = demo_checkpoint(args.checkpoint)
    llm = load(args, path)
    print(f"\ngenerating with the tiny random DeepSeek-V3 at {path} ({args.device}, {args.dtype}, {llm.model.backend})")
    outputs = llm.generate(DEMO_PROMPTS, SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True))
    for output in outputs:
        print(f"  {output.prompt!r} -> {output.text!r}")
    print(format_stats(llm))
    return 0
