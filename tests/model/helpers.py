"""Running the model on whole sequences: page assignment and prefill/decode steps for tests."""

from __future__ import annotations

import torch

from dsv3.model.batch import AttentionBatch
from dsv3.model.transformer import DeepseekV3
from dsv3.reference.mla import PAGE_SIZE


def page_table(pages: list[list[int]]) -> torch.Tensor:
    """int32 [b, max_pages] block table from per-sequence page lists (rows padded with page 0, never read)."""
    width = max(len(p) for p in pages)
    return torch.tensor([p + [0] * (width - len(p)) for p in pages], dtype=torch.int32)


def contiguous_pages(lengths: list[int]) -> list[list[int]]:
    pages, next_page = [], 0
    for n in lengths:
        count = -(-n // PAGE_SIZE)
        pages.append(list(range(next_page, next_page + count)))
        next_page += count
    return pages


def prefill_logits(model: DeepseekV3, prompts: list[list[int]], pages: list[list[int]] | None = None, caches=None):
    """fp32 logits [T, vocab] of every prompt token, all prompts in one forward pass."""
    pages = pages or contiguous_pages([len(p) for p in prompts])
    caches = caches if caches is not None else model.allocate_kv_cache(1 + max(max(p) for p in pages))
    batch = AttentionBatch.build(page_table(pages), [0] * len(prompts), [len(p) for p in prompts])
    return model.logits(model.forward(torch.tensor([t for p in prompts for t in p]), batch, caches))


def greedy(
    model: DeepseekV3, prompt: list[int], steps: int, pages: list[int] | None = None
) -> tuple[list[int], torch.Tensor]:
    """Prefill the prompt, then decode `steps` tokens one at a time; returns the tokens and each step's logits."""
    total = len(prompt) + steps
    pages = pages or contiguous_pages([total])[0]
    caches = model.allocate_kv_cache(1 + max(pages))
    table = page_table([pages])
    batch = AttentionBatch.build(table, [0], [len(prompt)])
    logits = [model.logits(model.forward(torch.tensor(prompt), batch, caches))[-1]]
    tokens = [int(logits[-1].argmax())]
    for step in range(1, steps):
        batch = AttentionBatch.build(table, [len(prompt) + step - 1], [1])
        logits.append(model.logits(model.forward(torch.tensor(tokens[-1:]), batch, caches))[0])
        tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)
