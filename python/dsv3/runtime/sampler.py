"""Choosing the next token from logits: greedy, or sampling after temperature, top-k and top-p; and the accept/reject
rule that keeps MTP speculative decoding's output distributed exactly as plain decoding's."""

from __future__ import annotations

import torch

from dsv3.runtime.sampling_params import SamplingParams


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """fp32 logits [V] -> the distribution sampling draws from: softmax(logits / T) restricted to the top_k most
    likely tokens and then to the smallest set of most likely tokens whose mass reaches top_p, renormalized."""
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        sorted_probs[mass_before >= params.top_p] = 0  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs /= probs.sum()
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from fp32 logits [V]."""
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits, params), 1, generator=generator))


def verify_greedy(best: list[int], draft: int) -> tuple[list[int], bool]:
    """Greedy verification from the argmax of each row: the draft is kept when it is row 0's, and row 1's follows."""
    first, second = best
    return ([first, second], True) if first == draft else ([first], False)


def verify_draft(
    logits: torch.Tensor, draft: int, params: SamplingParams, generator: torch.Generator
) -> tuple[list[int], bool]:
    """logits [2, V] of the step that fed (last token, draft): row 0 predicts the draft's position, row 1 the next.

    Returns the tokens to append and whether the draft was accepted. Greedy: the draft is kept when it is the argmax,
    and the argmax of row 1 follows it. Sampling: the draft is a deterministic guess, so it is kept with probability
    p(draft); when rejected, the token is drawn from p with the draft removed — together exactly p (speculative
    sampling with a one-hot proposal).
    """
    if params.greedy:
        return verify_greedy(logits.argmax(dim=-1).tolist(), draft)
    probs = probabilities(logits[0], params)
    if float(torch.rand((), generator=generator)) < float(probs[draft]):
        return [draft, sample(logits[1], params, generator)], True
    probs[draft] = 0
    return [int(torch.multinomial(probs / probs.sum(), 1, generator=generator))], False
