"""Choosing the next token from logits: greedy, or sampling after temperature, top-k and top-p; and the accept/reject
rule that keeps MTP speculative decoding's output distributed exactly as plain decoding's.

`probabilities` states one row's distribution. The engine takes a step's tokens for all rows at once on the logits'
device (`next_tokens`, `verify_tokens`), so no [b, vocab] block crosses to the host: sorting and drawing 129K-entry
rows one by one on the host took 10-30 ms a row. A draw is the inverse CDF at one uniform number from the request's
own generator, so a seeded request draws the same tokens whatever else is in the batch."""

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


def batch_probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """probabilities() of every row of logits [n, V] (row i with params[i]), in one pass of tensor ops on the rows'
    device."""
    vocab = logits.shape[-1]
    device = logits.device
    temperatures = torch.tensor([p.temperature for p in params], device=device)
    logits = logits.float() / temperatures[:, None]
    if any(p.top_k > 0 for p in params):
        k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=device)
        kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1 for p in params):
        top_p = torch.tensor([p.top_p if p.top_p < 1 else 2.0 for p in params], device=device)  # 2: never reached
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None], 0)  # the most likely token stays
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        probs /= probs.sum(-1, keepdim=True)
    return probs


def _uniforms(generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """One number in [0, 1) from each generator (a request's own: its draws do not depend on the rest of the batch)."""
    return torch.tensor([float(torch.rand((), generator=g)) for g in generators], device=device)


def inverse_cdf_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token of each row of probs [n, V] (non-negative, any total) at the fraction u [n] of its mass: the inverse CDF,
    so a token is drawn with probability its share of the row's mass."""
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    # u times the total can round up to the total: take the last token with mass rather than run off the end
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(index, last)


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """The next token of each row of logits [n, V]: the argmax for greedy requests, a draw from probabilities() for
    the others, all rows at once on the logits' device; one transfer to the host."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        probs = batch_probabilities(logits[rows], [params[i] for i in sampled])
        tokens[rows] = inverse_cdf_draw(probs, _uniforms([generators[i] for i in sampled], logits.device))
    return tokens.tolist()


def verify_tokens(
    logits: torch.Tensor, drafts: list[int], params: list[SamplingParams], generators: list[torch.Generator]
) -> list[tuple[list[int], bool]]:
    """logits [n, 2, V] of a step that fed (last token, draft) for each of n sequences: row 0 predicts the draft's
    position, row 1 the next. Returns, per sequence, the tokens to append and whether the draft was kept.

    Greedy: the draft is kept when it is row 0's argmax, and row 1's argmax follows it. Sampling: the draft is a
    deterministic guess, so it is kept with probability p(draft); when rejected, the token is drawn from p with the
    draft removed: together exactly p (speculative sampling with a one-hot proposal). All rows at once on the logits'
    device, one transfer to the host.
    """
    device = logits.device
    draft = torch.tensor(drafts, device=device)
    best = logits.argmax(dim=-1)  # [n, 2]
    first, second, kept = best[:, 0], best[:, 1], best[:, 0] == draft
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=device)
        row_params = [params[i] for i in sampled]
        probs = batch_probabilities(logits[rows].flatten(0, 1), [p for p in row_params for _ in (0, 1)])
        probs = probs.view(len(sampled), 2, -1)
        row_generators = [generators[i] for i in sampled]
        keep_u, draw_u = _uniforms(row_generators, device), _uniforms(row_generators, device)
        guess = draft[rows][:, None]
        keep = keep_u < probs[:, 0].gather(1, guess)[:, 0]
        residual = probs[:, 0].scatter(1, guess, 0.0)
        drawn = inverse_cdf_draw(torch.where(keep[:, None], probs[:, 1], residual), draw_u)
        first, second, kept = first.clone(), second.clone(), kept.clone()
        first[rows] = torch.where(keep, guess[:, 0], drawn)
        second[rows] = drawn
        kept[rows] = keep
    rows = torch.stack([first, second, kept.long()], dim=1).tolist()
    return [([a, b], True) if keep else ([a], False) for a, b, keep in rows]


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]) -> list[dict[int, float]]:
    """For each row of logits [m, V]: the log-probability of tokens[i] and of the top[i] most likely tokens under the
    model's distribution (log-softmax of the logits), as {token: log-probability}; one transfer to the host."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])
    values, ids = logprobs.topk(max(top), dim=-1)
    rows = torch.cat([chosen.double(), values.double(), ids.double()], dim=1).tolist()  # ids < 2^53: exact
    k = max(top)
    return [
        {**{int(t): v for t, v in zip(row[1 + k : 1 + k + n], row[1 : 1 + n], strict=True)}, token: row[0]}
        for row, token, n in zip(rows, tokens, top, strict=True)
    ]
