"""SamplingParams(logprobs=k): each generated token's log-probability and its k most likely alternatives, under the
model's own distribution (log-softmax of its logits), whichever path produced the token."""

from __future__ import annotations

import pytest
import torch

from dsv3.runtime import SamplingParams
from dsv3.runtime.engine import Engine
from dsv3.runtime.sampler import token_logprobs
from tests.model.helpers import greedy, prefill_logits
from tests.runtime.test_generate import random_prompts

PROMPTS = random_prompts([15, 70], seed=21)


def test_greedy_logprobs_are_the_model_log_softmax_at_each_step(llm):
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3))
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        tokens, logits = greedy(llm.model, prompt, 8)
        assert output.token_ids == tokens and len(output.logprobs) == 8
        expected = torch.log_softmax(logits, dim=-1)
        for token, entry, row in zip(tokens, output.logprobs, expected, strict=True):
            top = row.topk(3)
            assert set(entry) == set(top.indices.tolist()) and token in entry  # greedy: the chosen token is the top
            for t, value in entry.items():
                assert value == pytest.approx(float(row[t]), abs=1e-4)


def check_against_one_forward(model, prompt: list[int], output) -> None:
    """Each reported log-probability against the log-softmax of one forward pass over the whole sequence."""
    logits = prefill_logits(model, [prompt + output.token_ids])[len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits, dim=-1)
    got = [entry[t] for entry, t in zip(output.logprobs, output.token_ids, strict=True)]
    assert got == pytest.approx([float(expected[i, t]) for i, t in enumerate(output.token_ids)], abs=1e-4)


def test_sampled_tokens_report_their_own_logprobs(llm):
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=4, ignore_eos=True, logprobs=0)
    for prompt, output in zip(PROMPTS, llm.generate(PROMPTS, params), strict=True):
        assert [list(entry) for entry in output.logprobs] == [[t] for t in output.token_ids]
        check_against_one_forward(llm.model, prompt, output)


def test_a_kept_draft_reports_the_logprobs_of_its_own_position(llm, llm_mtp, monkeypatch):
    greedy_params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    answers = {tuple(p): o.token_ids for p, o in zip(PROMPTS, llm.generate(PROMPTS, greedy_params), strict=True)}

    def oracle(self, sequences, mtp_logits, rows, finished):  # every draft right: each step keeps two tokens
        for s in sequences:
            answer = answers[tuple(s.token_ids[: s.num_prompt_tokens])]
            s.draft = None if s in finished else answer[min(len(s.output_ids), len(answer) - 1)]

    monkeypatch.setattr(Engine, "_draft", oracle)
    outputs = llm_mtp.generate(PROMPTS, greedy_params)
    assert llm_mtp.stats.acceptance_rate == 1.0
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        check_against_one_forward(llm_mtp.model, prompt, output)


def test_streams_carry_the_logprobs_of_their_tokens(llm):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    expected = llm.generate(PROMPTS[:1], params)[0]
    pieces = list(llm.stream(PROMPTS[:1], params))
    assert [entry for p in pieces for entry in p.logprobs] == pytest.approx(expected.logprobs)
    assert llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2))[0].logprobs is None


def test_token_logprobs_keep_the_chosen_token_and_the_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 2.0]])
    entries = token_logprobs(logits, [3, 1], [1, 2])
    lp = torch.log_softmax(logits, -1)
    assert entries[0] == pytest.approx({0: float(lp[0, 0]), 3: float(lp[0, 3])})
    assert entries[1] == pytest.approx({1: float(lp[1, 1]), 3: float(lp[1, 3])})


def test_bad_logprobs(llm):
    with pytest.raises(ValueError, match="logprobs: expected None or an int >= 0, got -1"):
        SamplingParams(logprobs=-1)
    with pytest.raises(ValueError, match="logprobs: expected at most the vocabulary's"):
        llm.generate([[0, 5]], SamplingParams(logprobs=10**6))
