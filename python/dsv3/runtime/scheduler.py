"""Which sequences run in the next step, and how many tokens each computes (continuous batching, chunked prefill).

Every step, in order: each running sequence that is decoding takes its one new token (two when speculating: the last
token and the MTP draft); then sequences still prefilling (their prompt, or everything after a preemption) take chunks
of their uncomputed tokens, and waiting requests are admitted, while the step's token budget and the sequence limit
allow. A request thus joins while others decode, and a long prompt is spread over several steps.

When a decoding sequence needs a page and none is free, the most recently admitted running sequence is preempted:
its pages are released and it goes back to the front of the queue, to be recomputed later (its sampled tokens kept).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dsv3.reference.mla import PAGE_SIZE
from dsv3.runtime.page_allocator import PageAllocator
from dsv3.runtime.sequence import Sequence


@dataclass
class Step:
    decodes: list[Sequence] = field(default_factory=list)  # each feeds its last token (+ its draft)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens computed this step)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        max_num_seqs: int,
        token_budget: int,
        speculative: bool,
        prefix_caching: bool = False,
    ):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.token_budget = token_budget
        self.speculative = speculative
        self.prefix_caching = prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.reused_tokens = 0  # tokens that admitted sequences found in the cache instead of computing them

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def decoding(self, sequence: Sequence) -> bool:
        """True when the next step feeds the sequence's last token alone (plus its draft when speculating)."""
        return sequence.num_uncomputed == 1 and (not self.speculative or sequence.draft is not None)

    def finish(self, sequence: Sequence) -> None:
        self._release(sequence)
        self.running.remove(sequence)

    def register(self, sequence: Sequence) -> None:
        """After a step: the pages the sequence's cached tokens now fill become reusable prefix pages."""
        if self.prefix_caching:
            self.allocator.register(sequence.pages, sequence.registered, sequence.token_ids, sequence.num_computed)

    def schedule(self) -> Step:
        step, budget = Step(), self.token_budget
        width = 2 if self.speculative else 1
        for sequence in list(self.running):
            if sequence not in self.running or not self.decoding(sequence) or budget < width:
                continue
            if self._make_room(sequence, sequence.num_computed + width):
                step.decodes.append(sequence)
                budget -= width
        for sequence in self.running:
            if budget > 0 and not self.decoding(sequence):
                budget -= self._add_chunk(step, sequence, budget)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            sequence = self.waiting[0]
            if self._first_page_in_progress(sequence):
                break  # a running sequence is computing the same first page: wait for it, then reuse it
            taken = self._add_chunk(step, sequence, budget)
            if not taken:
                break
            self.running.append(self.waiting.popleft())
            budget -= taken
        if not step and len(self.running) > 1:  # prefilling sequences hold every page: let the oldest go on alone
            self._preempt(self.running[-1])
            return self.schedule()
        return step

    def _add_chunk(self, step: Step, sequence: Sequence, budget: int) -> int:
        reused = self._reuse_prefix(sequence) if self.prefix_caching and not sequence.pages else 0
        chunk = min(sequence.num_uncomputed, budget)
        if not self.allocator.grow(sequence.pages, sequence.num_computed + chunk):
            if reused:
                self._release(sequence)
                sequence.reset_cache_state()
            return 0
        self.reused_tokens += reused
        step.prefills.append((sequence, chunk))
        return chunk

    def _first_page_in_progress(self, sequence: Sequence) -> bool:
        """Whether a running sequence shares this one's first page (and the token after it) and has not registered it
        yet: requests of a batch that begin alike (one prompt repeated, a shared system prompt) then compute it
        once."""
        if not self.prefix_caching or sequence.pages or len(sequence.token_ids) <= PAGE_SIZE:
            return False
        head = sequence.token_ids[: PAGE_SIZE + 1]
        return any(not other.registered and other.token_ids[: PAGE_SIZE + 1] == head for other in self.running)

    def _reuse_prefix(self, sequence: Sequence) -> int:
        """Takes the cached pages along the sequence's tokens (leaving at least its last token to compute, whose
        logits pick the next one); returns the tokens they hold."""
        pages, ids = self.allocator.match(sequence.token_ids, len(sequence.token_ids) - 1)
        sequence.pages.extend(pages)
        sequence.registered[:] = ids
        sequence.num_computed = len(pages) * PAGE_SIZE
        return sequence.num_computed

    def _release(self, sequence: Sequence) -> None:
        self.allocator.release(sequence.pages)
        sequence.registered.clear()

    def _make_room(self, sequence: Sequence, num_tokens: int) -> bool:
        """Grow the sequence's pages to num_tokens, preempting the newest sequences if needed; False when the sequence
        itself had to be preempted."""
        while not self.allocator.grow(sequence.pages, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is sequence:
                return False
        return True

    def _preempt(self, sequence: Sequence) -> None:
        self.running.remove(sequence)
        self._release(sequence)
        sequence.reset_cache_state()
        self.waiting.appendleft(sequence)
        self.num_preemptions += 1
