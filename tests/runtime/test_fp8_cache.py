"""Generation over the 656-byte FP8 latent cache.

What "close" means: the FP8 cache rounds each latent value to e4m3 with a scale per 128 values (relative error up to
2^-4). In a float32 model, where the cache is the only quantized thing, that moves the logits by calc_diff ~2e-3 at a
typical step; now and then the perturbation flips an expert choice of the random tiny MoE and one step jumps to
~0.07. Greedy tokens can flip on near-ties, so the check is on logits fed the same tokens (teacher forcing) against a
bf16 cache: median calc_diff < 5e-3 and every step < 0.15, while a wrong layout or scale gives calc_diff near 1. It
must also differ from the bf16 cache at all, or FP8 was not used.
"""

from __future__ import annotations

import statistics

import torch

from dsv3.model.batch import AttentionBatch
from dsv3.runtime import LLM, SamplingParams
from dsv3.testing import calc_diff
from tests.model.helpers import page_table
from tests.runtime.test_generate import random_prompts

PROMPT = random_prompts([20], seed=4)[0]


def teacher_forced_logits(llm: LLM, tokens: list[int], prompt_len: int) -> torch.Tensor:
    caches, table = llm.cache.layers, page_table([[0]])
    model = llm.model
    batch = AttentionBatch.build(table, [0], [prompt_len])
    rows = [model.logits(model.forward(torch.tensor(tokens[:prompt_len]), batch, caches))[-1]]
    for p in range(prompt_len, len(tokens)):
        batch = AttentionBatch.build(table, [p], [1])
        rows.append(model.logits(model.forward(torch.tensor(tokens[p : p + 1]), batch, caches))[0])
    return torch.stack(rows)


def test_fp8_cache_generation_stays_close_to_bf16_cache(tiny):
    bf16 = LLM(tiny, dtype="float32", kv_cache_dtype="bf16", num_kv_pages=2)
    fp8 = LLM(tiny, dtype="float32", kv_cache_dtype="fp8", num_kv_pages=2)
    assert fp8.cache.layers[0].dtype == torch.uint8 and fp8.cache.layers[0].shape[-1] == 656
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reference = bf16.generate([PROMPT], params)[0]
    generated = fp8.generate([PROMPT], params)[0]
    assert len(generated.token_ids) == 16 and generated.token_ids[0] == reference.token_ids[0]
    tokens = PROMPT + reference.token_ids[:-1]
    exact, quantized = teacher_forced_logits(bf16, tokens, len(PROMPT)), teacher_forced_logits(fp8, tokens, len(PROMPT))
    diffs = [calc_diff(q, e) for q, e in zip(quantized, exact, strict=True)]
    assert 0 < statistics.median(diffs) < 5e-3 and max(diffs) < 0.15
