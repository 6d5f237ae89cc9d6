"""IncrementalDetokenizer: the text it builds token by token is the whole list's text (but for a trailing incomplete
character), and each step decodes a short window, not the whole output."""

from __future__ import annotations

import random

from dsv3.runtime import SamplingParams
from dsv3.runtime.detokenizer import REPLACEMENT, IncrementalDetokenizer
from dsv3.runtime.sequence import Sequence


class CountingTokenizer:
    """The tiny checkpoint's tokenizer, recording how many tokens each decode call is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids)


def test_text_equals_decoding_the_whole_list_after_every_token(llm):
    tokenizer = llm.tokenizer
    rng = random.Random(0)
    # random ids (byte tokens among them: characters split, and bytes that never form one) and real text
    ids = [0] + [rng.randrange(4, llm.model.config.vocab_size) for _ in range(1500)]
    ids += tokenizer.encode("naïve 日本語 text", add_special_tokens=False) * 3
    detokenizer = IncrementalDetokenizer(tokenizer, 1)
    for n in range(2, len(ids) + 1):
        detokenizer.update(ids[:n])
        assert detokenizer.text == tokenizer.decode(ids[1:n]).rstrip(REPLACEMENT), f"after {n} tokens"
    assert "日本語" in detokenizer.text


def test_each_token_decodes_a_short_window(llm):
    counting = CountingTokenizer(llm.tokenizer)
    text = "The weights are stored in eight-bit floating point. " * 40
    ids = [0, *llm.tokenizer.encode(text, add_special_tokens=False)]
    detokenizer = IncrementalDetokenizer(counting, 1)
    for n in range(2, len(ids) + 1):
        detokenizer.update(ids[:n])
    assert len(ids) > 300 and max(counting.lengths) <= 4


def test_a_stop_string_over_several_tokens_cuts_the_text(llm):
    tokenizer = llm.tokenizer
    ids = tokenizer.encode("one two three four five six", add_special_tokens=False)
    params = SamplingParams(max_tokens=len(ids), stop=["four fi", "x"], ignore_eos=True)
    sequence = Sequence(0, [0], params, (1,), tokenizer)
    finished_at = next(n for n, token in enumerate(ids, 1) if sequence.append(token))
    assert sequence.text == "one two three " and sequence.finish_reason == "stop"
    assert tokenizer.decode(ids[:finished_at]).endswith("four fi")  # it stopped at the token completing the string
