"""MTP speculative decoding: drafts verified with s_q = 2 leave greedy output unchanged."""

from __future__ import annotations

import pytest

from dsv3.runtime import SamplingParams
from dsv3.runtime.engine import Engine
from tests.runtime.test_generate import random_prompts

PROMPTS = random_prompts([7, 33, 70], seed=3)
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_mtp_greedy_equals_plain_greedy(llm_mtp, plain):
    outputs = llm_mtp.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == plain
    assert all(0 <= o.mtp_acceptance_rate <= 1 for o in outputs)
    stats = llm_mtp.stats
    assert stats.drafted > 0 and 0 <= stats.acceptance_rate <= 1


@pytest.mark.parametrize("oracle", [True, False])
def test_accepted_and_rejected_drafts_keep_greedy_output(llm_mtp, plain, monkeypatch, oracle):
    """The tiny model's random MTP module rarely guesses right; a drafter that knows the answer (or always misses)
    exercises every path of the verification."""
    expected = {tuple(p): out for p, out in zip(PROMPTS, plain, strict=True)}

    def draft(self, sequences, mtp_logits, rows, finished):
        for s in sequences:
            answer = expected[tuple(s.token_ids[: s.num_prompt_tokens])]
            upcoming = answer[len(s.output_ids)] if len(s.output_ids) < len(answer) else 0
            s.draft = None if s in finished else (upcoming if oracle else (upcoming + 1) % 1000)

    monkeypatch.setattr(Engine, "_draft", draft)
    outputs = llm_mtp.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == plain
    assert llm_mtp.stats.acceptance_rate == (1.0 if oracle else 0.0)
    if oracle:  # two tokens per step
        assert llm_mtp.stats.steps < 30


def test_mtp_sampling_is_seeded(llm_mtp):
    params = SamplingParams(temperature=0.8, top_k=50, max_tokens=12, seed=5, ignore_eos=True)
    first = [o.token_ids for o in llm_mtp.generate(PROMPTS, params)]
    assert [o.token_ids for o in llm_mtp.generate(PROMPTS, params)] == first
    assert all(len(t) == 12 for t in first)
