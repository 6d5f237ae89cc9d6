"""Bookkeeping of the paged latent cache's pages: which are free, and which each sequence holds."""

from __future__ import annotations

from dsv3.reference.mla import PAGE_SIZE


def pages_for(num_tokens: int) -> int:
    return -(-num_tokens // PAGE_SIZE)


class PageAllocator:
    """A free list of page ids 0 .. num_pages - 1. Pages are handed out lowest id first, which keeps a short run's
    working set small; a sequence's pages need not be contiguous (its block table maps positions to pages)."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages: expected at least 1, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # popped from the end

    @property
    def num_free(self) -> int:
        return len(self._free)

    def grow(self, pages: list[int], num_tokens: int) -> bool:
        """Extend `pages` (in place) to hold num_tokens tokens; False, changing nothing, when too few pages are free."""
        needed = pages_for(num_tokens) - len(pages)
        if needed > len(self._free):
            return False
        pages.extend(self._free.pop() for _ in range(max(needed, 0)))
        return True

    def release(self, pages: list[int]) -> None:
        """Return a sequence's pages (emptying the list)."""
        self._free.extend(reversed(pages))
        pages.clear()
