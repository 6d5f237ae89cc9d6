"""When a sequence stops: max_tokens, stop tokens, end of sequence (unless ignore_eos), stop strings."""

from __future__ import annotations

from dsv3.runtime import SamplingParams
from dsv3.runtime.sequence import Sequence
from tests.runtime.test_generate import random_prompts

PROMPT = random_prompts([12], seed=2)[0]


def greedy_run(llm, **kwargs):
    return llm.generate([PROMPT], SamplingParams(temperature=0, **kwargs))[0]


def test_max_tokens_and_stop_token_ids(llm):
    full = greedy_run(llm, max_tokens=16, ignore_eos=True)
    assert len(full.token_ids) == 16 and full.finish_reason == "length"
    assert greedy_run(llm, max_tokens=5, ignore_eos=True).token_ids == full.token_ids[:5]
    stop_token = full.token_ids[6]
    cut = greedy_run(llm, max_tokens=16, stop_token_ids=[stop_token], ignore_eos=True)
    first = full.token_ids.index(stop_token)
    assert cut.token_ids == full.token_ids[: first + 1] and cut.finish_reason == "stop"


def test_stop_strings_cut_the_text(llm):
    full = greedy_run(llm, max_tokens=16, ignore_eos=True)
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip()
    cut = greedy_run(llm, max_tokens=16, stop=[stop], ignore_eos=True)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < 16


def test_end_of_sequence_stops_unless_ignored(llm):
    eos = llm.model.config.eos_token_ids[0]

    def sequence(ignore_eos):
        return Sequence(0, [0, 5], SamplingParams(max_tokens=8, ignore_eos=ignore_eos), (eos,), llm.tokenizer)

    stopping = sequence(False)
    assert not stopping.append(7)
    assert stopping.append(eos) and stopping.finish_reason == "stop" and stopping.output_ids == [7, eos]
    ignoring = sequence(True)
    assert not ignoring.append(eos) and ignoring.finish_reason is None
