"""PageAllocator hands out free pages; PageList keeps a sequence's ids and their int32 mirror equal."""

from __future__ import annotations

import pytest
import torch

from dsv3.runtime.page_allocator import PageAllocator, PageList, block_table


def test_grow_takes_the_lowest_free_pages_and_refuses_what_does_not_fit():
    allocator, pages = PageAllocator(5), PageList()
    assert allocator.grow(pages, 65) and pages == [0, 1]
    assert not allocator.grow(pages, 64 * 6) and pages == [0, 1] and allocator.num_free == 3
    allocator.release(pages)
    assert pages == [] and allocator.num_free == 5


def test_the_tensor_follows_every_extend_and_clear():
    allocator, a, b = PageAllocator(100), PageList(), PageList()
    for tokens in (1, 64, 65, 64 * 17, 64 * 40):  # past the mirror's first 16 entries
        assert allocator.grow(a, tokens) and allocator.grow(b, tokens // 2 + 1)
        assert a.tensor.tolist() == a and b.tensor.tolist() == b
    allocator.release(a)
    assert a.tensor.numel() == 0
    assert allocator.grow(a, 64 * 3) and a.tensor.tolist() == a  # ids handed out again, from the freed ones


def test_block_table_pads_with_zeros():
    table = block_table([PageList([7, 3, 9]), PageList([4]), PageList([5, 6])])
    assert table.dtype == torch.int32 and table.tolist() == [[7, 3, 9], [4, 0, 0], [5, 6, 0]]


@pytest.mark.parametrize("change", [lambda p: p.append(1), lambda p: p.__setitem__(0, 1), lambda p: p.pop()])
def test_other_changes_are_refused(change):
    with pytest.raises(TypeError, match="changes only through extend and clear"):
        change(PageList([2, 3]))
