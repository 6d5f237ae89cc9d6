"""Sampling: filters, seeds, and the speculative accept/reject rule's distribution."""

from __future__ import annotations

import torch

from dsv3.runtime import SamplingParams
from dsv3.runtime.sampler import probabilities, verify_draft
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


def test_speculative_sampling_keeps_the_target_distribution():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5], [0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=1.0)
    generator = torch.Generator().manual_seed(0)
    draws = 20000
    counts = torch.zeros(4)
    accepted = 0
    for _ in range(draws):
        tokens, ok = verify_draft(logits, 1, params, generator)
        counts[tokens[0]] += 1
        accepted += ok
    target = torch.softmax(logits[0], 0)
    torch.testing.assert_close(counts / draws, target, atol=0.015, rtol=0)
    assert abs(accepted / draws - float(target[1])) < 0.015  # the draft is kept with probability p(draft)
