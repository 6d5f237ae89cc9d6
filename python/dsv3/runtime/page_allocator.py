"""Bookkeeping of the paged latent cache's pages: which are free, which each sequence holds, and which keep a prefix
that later sequences can reuse."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch.nn.utils.rnn import pad_sequence

from dsv3.reference.mla import PAGE_SIZE


def pages_for(num_tokens: int) -> int:
    return -(-num_tokens // PAGE_SIZE)


class PageList(list):
    """A sequence's page ids, mirrored in an int32 tensor that grows with the list, so that a step's block table is
    one pad_sequence over tensors instead of a conversion of Python lists (4 ms a step for 64 sequences of 32K
    tokens). It changes only through extend and clear, which keep the two equal."""

    def __init__(self, ids=()):
        super().__init__()
        self._ids = torch.empty(16, dtype=torch.int32)
        self.extend(ids)

    def extend(self, ids) -> None:
        ids, start = list(ids), len(self)
        if not ids:
            return  # the allocator extends every sequence every step, mostly by nothing
        super().extend(ids)
        if len(self) > self._ids.shape[0]:
            grown = torch.empty(max(2 * self._ids.shape[0], len(self)), dtype=torch.int32)
            grown[:start] = self._ids[:start]
            self._ids = grown
        self._ids[start : len(self)] = torch.tensor(ids, dtype=torch.int32)

    @property
    def tensor(self) -> torch.Tensor:
        """int32 [len(self)], the ids (a view: read it before the list changes)."""
        return self._ids[: len(self)]

    def _unchanged(self, *args, **kwargs):
        raise TypeError("PageList: changes only through extend and clear (its tensor mirrors it)")

    append = insert = pop = remove = sort = reverse = __setitem__ = __delitem__ = __iadd__ = __imul__ = _unchanged


def _page_key(parent: int, token_ids: list[int], end: int) -> tuple:
    """The registration key of the page whose tokens end before position `end`: the registration id of the page
    before it (-1 for the first), its tokens, and the token after them."""
    return parent, tuple(token_ids[end - PAGE_SIZE : end]), token_ids[end]


def block_table(page_lists: list[PageList]) -> torch.Tensor:
    """int32 [len(page_lists), the longest list]: each sequence's page ids, zero-padded."""
    return pad_sequence([pages.tensor for pages in page_lists], batch_first=True)


class PageAllocator:
    """Page ids 0 .. num_pages - 1: free, held by sequences (counted: a page of a shared prefix is held by each sequence
    that reuses it), or cached: held by none but keeping a registered prefix page for later sequences, until a free
    page is wanted and none is left (least recently released first). Pages are handed out lowest id first, which
    keeps a short run's working set small; a sequence's pages need not be contiguous (its block table maps positions
    to pages).

    Prefix reuse: a page is registered once its 64 tokens and the token after them are in the cache (the MTP layer's
    row at a position depends on the next token), under its tokens, that next token and the registration of the page
    before it, so a key names the whole prefix through the next token exactly. A new sequence takes the registered
    pages along its tokens; it never writes into them (it only writes positions past its cached ones)."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages: expected at least 1, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # popped from the end
        self._holders = [0] * num_pages
        self._cached: OrderedDict[int, None] = OrderedDict()  # registered pages no sequence holds, oldest first
        self._registered: dict[tuple, tuple[int, int]] = {}  # (parent id, tokens, next token) -> (page, id)
        self._key_of: dict[int, tuple] = {}  # page -> its key in _registered
        self._next_id = 0

    @property
    def num_free(self) -> int:
        """Pages a sequence can take: free or cached."""
        return len(self._free) + len(self._cached)

    def grow(self, pages: list[int], num_tokens: int) -> bool:
        """Extend `pages` (in place) to hold num_tokens tokens, taking free pages, then the oldest cached ones; False,
        changing nothing, when too few are left."""
        needed = pages_for(num_tokens) - len(pages)
        if needed > self.num_free:
            return False
        taken = []
        for _ in range(max(needed, 0)):
            page = self._free.pop() if self._free else self._evict()
            self._holders[page] = 1
            taken.append(page)
        pages.extend(taken)
        return True

    def release(self, pages: list[int]) -> None:
        """A sequence lets its pages go (emptying the list): a page no sequence holds is cached if registered, else
        free."""
        for page in reversed(pages):
            self._holders[page] -= 1
            if self._holders[page] == 0:
                if page in self._key_of:
                    self._cached[page] = None
                else:
                    self._free.append(page)
        pages.clear()

    def match(self, token_ids: list[int], limit: int) -> tuple[list[int], list[int]]:
        """The registered pages along token_ids, from the first, covering at most `limit` tokens, now held by the
        caller too; returns them and their registration ids."""
        pages, ids, parent = [], [], -1
        for i in range(limit // PAGE_SIZE):
            end = (i + 1) * PAGE_SIZE
            if end >= len(token_ids):
                break
            entry = self._registered.get(_page_key(parent, token_ids, end))
            if entry is None:
                break
            page, parent = entry
            if self._holders[page] == 0:
                del self._cached[page]
            self._holders[page] += 1
            pages.append(page)
            ids.append(parent)
        return pages, ids

    def register(self, pages: list[int], ids: list[int], token_ids: list[int], num_computed: int) -> None:
        """Registers a sequence's pages that its cached tokens (the first num_computed) now fill, with the token after
        them; ids holds the registration ids of its pages registered so far and grows with them."""
        while len(ids) < len(pages) and (len(ids) + 1) * PAGE_SIZE < num_computed:
            i = len(ids)
            end = (i + 1) * PAGE_SIZE
            key = _page_key(ids[-1] if ids else -1, token_ids, end)
            entry = self._registered.get(key)
            if entry is None:  # another page may hold the same prefix already: its id serves the pages after
                entry = self._registered[key] = (pages[i], self._next_id)
                self._key_of[pages[i]] = key
                self._next_id += 1
            ids.append(entry[1])

    def _evict(self) -> int:
        page, _ = self._cached.popitem(last=False)
        del self._registered[self._key_of.pop(page)]
        return page
