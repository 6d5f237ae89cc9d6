"""LLM.generate against the model run by hand, and under continuous batching, chunked prefill and preemption."""

from __future__ import annotations

import random

import pytest

from dsv3.runtime import LLM, SamplingParams
from dsv3.runtime.engine import Engine
from dsv3.runtime.scheduler import Scheduler
from tests.model.helpers import greedy

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def random_prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[0] + [rng.randrange(4, 1000) for _ in range(n - 1)] for n in lengths]


def test_greedy_generate_equals_a_manual_greedy_loop(llm):
    prompt = random_prompts([15])[0]
    expected, _ = greedy(llm.model, prompt, 12)
    [output] = llm.generate([prompt], GREEDY)
    assert output.token_ids == expected
    assert output.finish_reason == "length" and output.num_prompt_tokens == 15 and output.num_generated_tokens == 12
    assert len(set(expected)) > 2  # not a degenerate repetition


def test_text_prompts_are_tokenized_and_outputs_detokenized(llm):
    [output] = llm.generate("The quick brown fox", GREEDY)
    assert output.prompt_token_ids == llm.tokenizer.encode("The quick brown fox")
    assert output.prompt_token_ids[0] == llm.model.config.bos_token_id
    assert output.text == llm.tokenizer.decode(output.token_ids)
    assert output.time_s > 0


def test_continuous_batching_gives_each_sequence_what_it_gets_alone(tiny, llm, monkeypatch):
    prompts = random_prompts([3, 70, 1, 20, 130, 9])
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 4, 12, 6, 3, 10)]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    steps = []
    schedule = Scheduler.schedule
    monkeypatch.setattr(Scheduler, "schedule", lambda self: steps.append(schedule(self)) or steps[-1])
    # 3 sequences at a time and 32 tokens per step: prompts are chunked, and requests join while others decode.
    batched = LLM(tiny, dtype="float32", max_num_seqs=3, max_num_batched_tokens=32, num_kv_pages=48)
    outputs = batched.generate(prompts, params)
    assert [o.token_ids for o in outputs] == alone
    assert any(s.decodes and s.prefills for s in steps)
    long_prompt_chunks = [n for step in steps for s, n in step.prefills if s.num_prompt_tokens == 130]
    assert len(long_prompt_chunks) > 1 and max(long_prompt_chunks) <= 32


def test_preempted_sequences_are_recomputed_to_the_same_result(tiny, llm):
    prompts = random_prompts([60, 58, 55])
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    tight = LLM(tiny, dtype="float32", num_kv_pages=4)  # 3 sequences grow past 64 tokens into a 4-page cache
    assert [o.token_ids for o in tight.generate(prompts, GREEDY)] == alone
    assert tight.stats.preemptions > 0


def test_a_step_that_raises_leaves_no_page_taken(llm, monkeypatch):
    """The cache outlives a generate call (a chat turn interrupted by Ctrl-C must not shrink the next one's)."""
    free = llm.cache.allocator.num_free
    step = Engine.step

    def failing_second_step(self):
        if self.stats.steps == 1:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Engine, "step", failing_second_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(random_prompts([3, 70]), GREEDY)
    assert llm.cache.allocator.num_free == free
