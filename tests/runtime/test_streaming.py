"""LLM.stream: the pieces of each request add up to what generate returns, and only settled text is let out."""

from __future__ import annotations

import pytest

from dsv3.runtime import LLM, SamplingParams
from dsv3.runtime.engine import Engine
from dsv3.runtime.sequence import Sequence
from dsv3.runtime.streaming import TextStream
from tests.runtime.test_generate import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["The quick brown fox", *random_prompts([15, 3], seed=4)]


def pieces_by_request(pieces):
    by_index = {}
    for piece in pieces:
        by_index.setdefault(piece.index, []).append(piece)
    return [by_index[i] for i in sorted(by_index)]


def test_pieces_add_up_to_the_generated_outputs(llm):
    expected = llm.generate(PROMPTS, GREEDY)
    requests = pieces_by_request(llm.stream(PROMPTS, GREEDY))
    assert len(requests) == len(PROMPTS)
    for pieces, output in zip(requests, expected, strict=True):
        assert [t for p in pieces for t in p.token_ids] == output.token_ids
        assert "".join(p.text for p in pieces) == output.text and output.text
        assert [p.finish_reason for p in pieces] == [None] * (len(pieces) - 1) + ["length"]
        assert [len(p.token_ids) for p in pieces] == [1] * GREEDY.max_tokens  # each step's token let out at once


def test_a_kept_draft_comes_out_with_its_step(llm, llm_mtp, monkeypatch):
    expected = llm.generate(PROMPTS, GREEDY)
    answers = {tuple(o.prompt_token_ids): o.token_ids for o in expected}

    def oracle(self, sequences, mtp_logits, rows, finished):  # drafts the right token: every draft is kept
        for s in sequences:
            answer = answers[tuple(s.token_ids[: s.num_prompt_tokens])]
            s.draft = None if s in finished else answer[min(len(s.output_ids), len(answer) - 1)]

    monkeypatch.setattr(Engine, "_draft", oracle)
    requests = pieces_by_request(llm_mtp.stream(PROMPTS, GREEDY))
    for pieces, output in zip(requests, expected, strict=True):
        assert [t for p in pieces for t in p.token_ids] == output.token_ids
        assert "".join(p.text for p in pieces) == output.text
        # the prefill's token, then each verification's fed token with its kept draft
        assert [len(p.token_ids) for p in pieces] == [1] + [2] * 5 + [1]


def test_stop_strings_never_show_in_a_piece(llm):
    prompt = random_prompts([12], seed=2)[0]
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    stop = full.text[len(full.text) // 2 :][:3]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop])
    cut = llm.generate([prompt], params)[0]
    [pieces] = pieces_by_request(llm.stream([prompt], params))
    shown = ""
    for piece in pieces:
        shown += piece.text
        assert cut.text.startswith(shown)
    assert shown == cut.text and pieces[-1].finish_reason == "stop"


def feed(tokenizer, ids, stop=()):
    """Appends ids one by one to a sequence, polling its stream after each: the text let out after each token."""
    params = SamplingParams(max_tokens=len(ids), stop=list(stop), ignore_eos=True)  # the last token finishes it
    sequence = Sequence(0, [0], params, (1,), tokenizer)
    stream, shown = TextStream(sequence), []
    for token in ids:
        sequence.append(token)
        shown.append(stream.poll().text)
    return shown


def test_a_character_waits_for_its_last_byte(llm):
    # the tiny tokenizer spells 日, 本 and ï over several byte tokens
    ids = llm.tokenizer.encode("日本 naïve", add_special_tokens=False)
    shown = feed(llm.tokenizer, ids)
    assert "".join(shown) == "日本 naïve" and not any("\ufffd" in s for s in shown)
    assert shown[:3] == ["", "", "日"]


def test_text_that_may_start_a_stop_string_waits(llm):
    ids = llm.tokenizer.encode("one two three four", add_special_tokens=False)
    texts = [llm.tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    shown = feed(llm.tokenizer, ids, stop=["three!"])  # never completes: held text comes out at the end
    for i in range(len(ids) - 1):
        assert "".join(shown[: i + 1]) == texts[i][: max(len(texts[i]) - 5, 0)]
    assert "".join(shown) == "one two three four"


def test_polls_without_new_tokens_give_nothing_and_a_finished_stream_stays_quiet(llm):
    sequence = Sequence(0, [0], SamplingParams(max_tokens=2, ignore_eos=True), (1,), llm.tokenizer)
    stream = TextStream(sequence)
    assert stream.poll() is None
    sequence.append(50)
    assert stream.poll().token_ids == [50] and stream.poll() is None
    sequence.append(60)
    last = stream.poll()
    assert last.finished and last.token_ids == [60] and stream.poll() is None


def test_leaving_a_stream_early_frees_its_pages(llm):
    free = llm.cache.allocator.num_free
    pieces = llm.stream(PROMPTS, GREEDY)
    next(pieces)
    assert llm.cache.allocator.num_free < free
    pieces.close()
    assert llm.cache.allocator.num_free == free


def test_a_stream_that_finds_the_cache_taken_raises_instead_of_waiting(tiny):
    llm = LLM(tiny, dtype="float32", num_kv_pages=2)
    first = llm.stream([random_prompts([100])[0]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    next(first)  # holds both pages
    with pytest.raises(RuntimeError, match="another unfinished stream"):
        next(llm.stream([[0, 5]], GREEDY))
    first.close()
    assert [len(p.token_ids) for p in llm.stream([[0, 5]], GREEDY)] == [1] * GREEDY.max_tokens


def test_bad_arguments_raise_at_the_call(llm):
    with pytest.raises(ValueError, match="prompts: expected at least one prompt"):
        llm.stream([], GREEDY)
    with pytest.raises(ValueError, match="sampling_params: expected one per prompt"):
        llm.stream(PROMPTS, [GREEDY])
