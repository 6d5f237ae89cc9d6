"""Sampling: filters, seeds, and the speculative accept/reject rule's distribution."""

from __future__ import annotations

import torch

from dsv3.runtime import SamplingParams
from dsv3.runtime.sampler import batch_probabilities, inverse_cdf_draw, next_tokens, probabilities, verify_tokens
from tests.runtime.test_generate import random_prompts

PROMPTS = random_prompts([5, 17, 9], seed=1)


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(llm):
    def run(seed, prompts=PROMPTS):
        params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=10, seed=seed, ignore_eos=True)
        return [o.token_ids for o in llm.generate(prompts, params)]

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    assert run(7, PROMPTS[1:2]) == first[1:2]  # a seeded request does not depend on what else is in the batch


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    top1 = llm.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True, seed=3))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


def test_top_k_and_top_p_filters():
    logits = torch.tensor([3.0, 1.0, 2.0, 0.0, -1.0])
    kept = probabilities(logits, SamplingParams(top_k=2)) > 0
    assert kept.tolist() == [True, False, True, False, False]
    p = torch.softmax(logits, 0)
    nucleus = probabilities(logits, SamplingParams(top_p=float(p[0] + p[2]) - 1e-3)) > 0
    assert nucleus.tolist() == [True, False, True, False, False]  # the fewest tokens whose mass reaches top_p
    assert probabilities(logits, SamplingParams(top_p=1e-6)).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    sharp = probabilities(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(sharp, torch.softmax(logits / 0.5, 0))


def test_batched_probabilities_equal_the_one_row_statement():
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(top_k=5),
        SamplingParams(top_p=0.8),
        SamplingParams(temperature=1.3, top_k=40, top_p=0.9),
        SamplingParams(top_k=-1, top_p=1.0),
        SamplingParams(temperature=0.2, top_k=1000),  # more than the vocabulary
    ]
    batched = batch_probabilities(logits, params)
    for i, p in enumerate(params):
        torch.testing.assert_close(batched[i], probabilities(logits[i], p))


def test_inverse_cdf_draws_each_token_by_its_mass():
    probs = torch.tensor([0.5, 0.0, 0.25, 0.125, 0.125, 0.0])
    n = 1 << 12
    u = (torch.arange(n) + 0.5) / n  # evenly spread: the counts are exact
    counts = torch.bincount(inverse_cdf_draw(probs.expand(n, -1) * 3, u), minlength=6)  # any total
    assert counts.tolist() == [n // 2, 0, n // 4, n // 8, n // 8, 0]
    assert inverse_cdf_draw(probs[None], torch.tensor([1 - 2**-24])).item() == 4  # never a token without mass


def test_next_tokens_take_argmax_for_greedy_rows_and_draw_the_others_by_their_own_generators():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5), SamplingParams(top_k=1)]

    def run(rows):
        generators = [torch.Generator().manual_seed(5) for _ in rows]
        return next_tokens(logits[rows], [params[i] for i in rows], generators)

    tokens = run([0, 1, 2])
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    assert run([1]) == [tokens[1]]  # a seeded row draws the same alone


def test_speculative_sampling_keeps_the_target_distribution():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5], [0.0, 0.0, 0.0, 0.0]])
    draws = 20000
    generator = torch.Generator().manual_seed(0)
    verdicts = verify_tokens(logits.expand(draws, 2, 4), [1] * draws, [SamplingParams()] * draws, [generator] * draws)
    counts = torch.bincount(torch.tensor([tokens[0] for tokens, _ in verdicts]), minlength=4)
    accepted = sum(ok for _, ok in verdicts)
    target = torch.softmax(logits[0], 0)
    torch.testing.assert_close(counts / draws, target, atol=0.015, rtol=0)
    assert abs(accepted / draws - float(target[1])) < 0.015  # the draft is kept with probability p(draft)
    assert all(len(tokens) == (2 if ok else 1) and (tokens[0] == 1) == ok for tokens, ok in verdicts)


def test_greedy_verification_keeps_the_draft_when_it_is_the_argmax():
    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]], [[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]]])
    verdicts = verify_tokens(logits, [1, 2], [SamplingParams(temperature=0)] * 2, [torch.Generator()] * 2)
    assert verdicts == [([1, 0], True), ([1], False)]
