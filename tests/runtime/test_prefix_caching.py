"""Prefix caching: registered pages are found again by exactly the tokens that filled them (and the token after),
shared pages are counted, cached pages are evicted oldest first, and reusing them changes no generated token."""

from __future__ import annotations

import pytest

from dsv3.runtime import LLM, SamplingParams
from dsv3.runtime.page_allocator import PageAllocator, PageList
from tests.runtime.test_generate import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def computed_sequence(allocator: PageAllocator, tokens: list[int]) -> tuple[PageList, list[int]]:
    """Pages of a sequence whose tokens are all in the cache, registered."""
    pages, ids = PageList(), []
    assert allocator.grow(pages, len(tokens))
    allocator.register(pages, ids, tokens, len(tokens))
    return pages, ids


def test_pages_are_registered_once_the_token_after_them_is_cached():
    allocator, tokens = PageAllocator(8), list(range(1000, 1200))
    pages, ids = PageList(), []
    assert allocator.grow(pages, 200)
    allocator.register(pages, ids, tokens, 128)  # page 1 is full, but token 128 is not cached yet
    assert len(ids) == 1
    allocator.register(pages, ids, tokens, 200)
    assert len(ids) == 3  # the fourth page is not full
    allocator.release(pages)
    assert allocator.num_free == 8  # three cached, five free
    reused, _ = allocator.match(tokens, len(tokens) - 1)
    assert reused == [0, 1, 2] and allocator.num_free == 5


@pytest.mark.parametrize(
    ("change", "pages"),
    [(None, 3), (100, 1), (64, 0), (63, 0), (192, 2), (199, 3)],  # the token at `change` differs
)
def test_a_prefix_is_found_through_its_first_differing_token(change, pages):
    allocator, tokens = PageAllocator(8), list(range(1000, 1200))
    allocator.release(computed_sequence(allocator, tokens)[0])
    other = list(tokens)
    if change is not None:
        other[change] = 7
    assert len(allocator.match(other, len(other) - 1)[0]) == pages


def test_a_match_leaves_the_last_token_to_compute():
    allocator, tokens = PageAllocator(8), list(range(1000, 1129))
    allocator.release(computed_sequence(allocator, tokens)[0])  # pages 0 and 1 registered
    assert len(allocator.match(tokens, len(tokens) - 1)[0]) == 2  # 128 of the 129 tokens
    assert len(allocator.match(tokens[:128], 127)[0]) == 1  # all 128 would leave none to compute


def test_shared_pages_stay_held_until_every_holder_lets_go_then_go_deepest_first():
    allocator = PageAllocator(4)
    first = list(range(1000, 1130))
    pages, _ = computed_sequence(allocator, first)  # pages 0 and 1 registered, page 2 holds the last two tokens
    shared, _ = allocator.match(first, len(first) - 1)
    assert shared == [0, 1]
    allocator.release(pages)
    assert allocator.num_free == 2  # page 2 freed, page 3 never taken; 0 and 1 still held by the second holder
    other, _ = computed_sequence(allocator, list(range(2000, 2120)))
    assert sorted(other) == [2, 3] and allocator.num_free == 0
    allocator.release(PageList(shared))  # both cached now, the deeper page first
    taken = PageList()
    assert allocator.grow(taken, 1) and taken == [1]
    assert allocator.match(first, len(first) - 1)[0] == [0]


def test_eviction_takes_the_oldest_cached_page_and_forgets_its_prefix():
    allocator = PageAllocator(3)
    a, b = list(range(1000, 1065)), list(range(2000, 2065))
    allocator.release(computed_sequence(allocator, a)[0])  # page 0 cached (a), page 1 free again
    allocator.release(computed_sequence(allocator, b)[0])  # page 1 cached (b), page 2 free again
    assert allocator.num_free == 3
    assert allocator.grow(PageList(), 64 * 2)  # the free page, then the oldest cached one: a's
    assert allocator.match(a, 64)[0] == [] and allocator.match(b, 64)[0] == [1]


def test_reused_pages_change_no_token(tiny):
    shared = random_prompts([150], seed=9)[0]
    prompts = [[*shared, 5, 6, 7], [*shared, 8], shared[:70]]
    plain = LLM(tiny, dtype="float32", num_kv_pages=48, prefix_caching=False)
    expected = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    cached = LLM(tiny, dtype="float32", num_kv_pages=48)
    cached.generate(prompts[:1], GREEDY)  # fills the cache with the shared prefix
    assert [o.token_ids for o in cached.generate(prompts, GREEDY)] == expected
    assert cached.stats.reused_tokens == 128 + 128 + 64  # whole pages, each with the token after it
    assert plain.stats.reused_tokens == 0


def test_requests_of_one_batch_that_begin_alike_compute_their_prefix_once(tiny):
    system = random_prompts([140], seed=14)[0]
    prompts = [system, [*system, 5], [*system, 6, 7], random_prompts([30], seed=15)[0], system]
    plain = LLM(tiny, dtype="float32", num_kv_pages=48, prefix_caching=False)
    cached = LLM(tiny, dtype="float32", num_kv_pages=48)
    assert [o.token_ids for o in cached.generate(prompts, GREEDY)] == [
        o.token_ids for o in plain.generate(prompts, GREEDY)
    ]
    assert cached.stats.reused_tokens == 3 * 128  # each after the first waits one step, then takes its two pages
    assert cached.stats.prefill_tokens == plain.stats.prefill_tokens - 3 * 128


def test_a_chat_turn_reuses_the_last_turn_with_mtp(tiny):
    first = random_prompts([100], seed=11)[0]
    plain = LLM(tiny, dtype="float32", num_kv_pages=48, speculative="mtp", prefix_caching=False)
    cached = LLM(tiny, dtype="float32", num_kv_pages=48, speculative="mtp")
    reply = cached.generate([first], GREEDY)[0].token_ids
    assert reply == plain.generate([first], GREEDY)[0].token_ids
    second = [*first, *reply, 9, 10, 11]  # the next turn: the conversation so far, then the new message
    got, want = cached.generate([second], GREEDY)[0], plain.generate([second], GREEDY)[0]
    assert got.token_ids == want.token_ids
    assert got.mtp_acceptance_rate == want.mtp_acceptance_rate  # the MTP module read the same cache rows
    assert cached.stats.reused_tokens == 64  # the first turn's prompt and reply hold one whole page (and the next)


def test_a_page_is_not_reused_before_a_different_next_token(tiny):
    # The MTP layer's row at a page's last position is computed with the token after it: a page whose 64 tokens
    # match but whose next token differs is computed again, and the drafts stay those of an uncached run.
    stem = random_prompts([64], seed=13)[0]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    cached = LLM(tiny, dtype="float32", num_kv_pages=48, speculative="mtp")
    plain = LLM(tiny, dtype="float32", num_kv_pages=48, speculative="mtp", prefix_caching=False)
    cached.generate([[*stem, 500, 501, 502]], params)
    prompt = [*stem, 600, 601, 602]
    got, want = cached.generate([prompt], params)[0], plain.generate([prompt], params)[0]
    assert cached.stats.reused_tokens == 0
    assert (got.token_ids, got.mtp_acceptance_rate) == (want.token_ids, want.mtp_acceptance_rate)


def test_preempted_sequences_find_their_own_pages_again(tiny):
    prompts = random_prompts([90, 100, 80], seed=12)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = [o.token_ids for o in LLM(tiny, dtype="float32", num_kv_pages=48).generate(prompts, params)]
    small = LLM(tiny, dtype="float32", num_kv_pages=6)  # too few for all three: sequences are preempted
    assert [o.token_ids for o in small.generate(prompts, params)] == expected
    assert small.stats.preemptions > 0
