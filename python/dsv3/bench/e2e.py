"""End to end: prefill and decode tokens/s of LLM.generate on the tiny checkpoint, at batch 1, 8 and 16, against
transformers' DeepseekV3ForCausalLM.generate on its BF16 conversion, in the same run. A last row times the prefill of
4 prompts of LONG_PROMPT tokens. Rows: `us` is the time per token (prefill: per prompt token; decode: per generated
token, all sequences together), so `x base` is the throughput ratio; extra holds tokens/s. Both sides run greedy,
bf16, with the same prompt lengths and number of new tokens (EOS ignored). dsv3's phase times come from its engine;
transformers' decode time is its generate time minus a forward pass over the prompts. On a GPU a third row per batch
times dsv3's decode replayed from CUDA graphs (LLM(cuda_graphs=True)).
"""

from __future__ import annotations

import tempfile
import time

import torch

from dsv3.bench.harness import Report, Row

BATCHES = (1, 8, 16)
LONG_PROMPT = 500


def _prompts(batch: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(batch)
    return [[0, *torch.randint(4, 1000, (length - 1,), generator=generator).tolist()] for _ in range(batch)]


def _dsv3(path, device, prompts, new_tokens, cuda_graphs=False) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s)."""
    from dsv3.runtime import LLM, SamplingParams

    # no prefix caching: the timed call would find the warm-up's pages and skip most of its prefill
    llm = LLM(
        path, device=device.type, dtype="bfloat16", max_num_batched_tokens=4096, num_kv_pages=64,
        cuda_graphs=cuda_graphs, prefix_caching=False,
    )  # fmt: skip
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    s = llm.stats
    return s.prefill_tokens / s.prefill_s, s.decode_tokens / s.decode_s


def _load_quietly(path):
    """transformers' model of the checkpoint, without its loading report (it lists the MTP layer, which its
    DeepseekV3ForCausalLM has no place for, as unexpected weights) or progress bar in the benchmark's output."""
    import transformers
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    finally:
        logging.enable_progress_bar()
        logging.set_verbosity(verbosity)


def _transformers(path, device, prompts, new_tokens) -> tuple[float, float]:
    model = _load_quietly(path).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        model(ids)  # warm-up
        start = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            attention_mask=torch.ones_like(ids),
        )
        total = time.perf_counter() - start
    return ids.numel() / prefill, ids.shape[0] * (new_tokens - 1) / (total - prefill)


def run(device: torch.device, quick: bool = False, reps: int | None = None) -> Report:
    from dsv3.model.convert import convert_to_bf16
    from dsv3.model.tiny import make_tiny_checkpoint

    prompt_len, new_tokens = (16, 8) if quick else (32, 32)
    report = Report(f"end to end on the tiny checkpoint ({device.type}, bf16, prompt {prompt_len}, {new_tokens} new)")
    with tempfile.TemporaryDirectory() as directory:
        fp8 = make_tiny_checkpoint(f"{directory}/fp8")
        bf16 = convert_to_bf16(fp8, f"{directory}/bf16")
        for batch in BATCHES:
            prompts = _prompts(batch, prompt_len)
            ours = _dsv3(fp8, device, prompts, new_tokens)
            theirs = _transformers(bf16, device, prompts, new_tokens)
            for phase, mine, base in zip(("prefill", "decode"), ours, theirs, strict=True):
                report.add(
                    Row(
                        f"generate {phase}", f"batch={batch}", device.type, us=1e6 / mine,
                        baseline="transformers", baseline_us=1e6 / base,
                        extra={"tokens_per_s": mine, "baseline_tokens_per_s": base},
                    )
                )  # fmt: skip
            if device.type == "cuda":  # the same decode replayed from CUDA graphs (captured in the warm-up call)
                graphed = _dsv3(fp8, device, prompts, new_tokens, cuda_graphs=True)[1]
                report.add(
                    Row(
                        "generate decode, CUDA graphs", f"batch={batch}", device.type, us=1e6 / graphed,
                        baseline="transformers", baseline_us=1e6 / theirs[1],
                        extra={"tokens_per_s": graphed, "baseline_tokens_per_s": theirs[1]},
                    )
                )  # fmt: skip
        if not quick:  # prompts of a chat's length, where attention takes a real share of the prefill
            prompts = _prompts(4, LONG_PROMPT)
            mine, base = _dsv3(fp8, device, prompts, 2)[0], _transformers(bf16, device, prompts, 2)[0]
            report.add(
                Row(
                    "generate prefill", f"batch=4 prompt={LONG_PROMPT}", device.type, us=1e6 / mine,
                    baseline="transformers", baseline_us=1e6 / base,
                    extra={"tokens_per_s": mine, "baseline_tokens_per_s": base},
                )
            )  # fmt: skip
    return report
