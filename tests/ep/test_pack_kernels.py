"""The expert-parallel packing kernels (dsv3.ops.ep) against the torch index ops they replace, bit for bit, with
arbitrary bytes (NaN patterns included), odd widths and offsets, skipped rows, empty inputs and bad indices."""

from __future__ import annotations

import pytest
import torch

from dsv3.ops.ep import combine_reduce, copy_rows, weighted_rows_sum
from dsv3.testing import assert_bitwise_equal


def random_bytes(rows: int, cols: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=g).to(device)


@pytest.mark.parametrize("width", [1, 6, 16, 100, 7168])
def test_copy_rows_gathers_and_scatters_byte_spans(device, width: int) -> None:
    src = random_bytes(9, width + 3, width, device)
    # Gather (pack): rows in any order and repeated, into columns [5, 5 + width) of a wider buffer.
    index = torch.tensor([4, 0, 4, 8, -1, 2], device=device)
    dst = random_bytes(6, width + 11, 1, device)
    expected = dst.clone()
    keep = index >= 0
    expected[keep, 5 : 5 + width] = src[index[keep], 3 : 3 + width]
    copy_rows(src, dst, src_index=index, src_offset=3, dst_offset=5, row_bytes=width)
    assert_bitwise_equal(dst, expected)
    # Scatter (unpack into slots): distinct destinations, -1 skipped, unwritten rows keep their bytes.
    target = torch.tensor([7, -1, 0, 3, 1, 8, 2, -1, 5], device=device)
    out = random_bytes(10, width, 2, device)
    expected = out.clone()
    used = target >= 0
    expected[target[used]] = src[used, :width]
    copy_rows(src, out, dst_index=target, row_bytes=width)
    assert_bitwise_equal(out, expected)


def test_copy_rows_between_dtypes_is_a_byte_copy(device) -> None:
    x = torch.randn(5, 12, device=device).to(torch.bfloat16)
    q = random_bytes(5, 8, 3, device).view(torch.float8_e4m3fn)
    buf = torch.zeros(5, 12 * 2 + 8, dtype=torch.uint8, device=device)
    copy_rows(x, buf)
    copy_rows(q, buf, dst_offset=24)
    assert_bitwise_equal(buf, torch.cat([x.view(torch.uint8), q.view(torch.uint8)], dim=1))
    back = torch.empty_like(x)
    copy_rows(buf, back)
    assert_bitwise_equal(back, x)


def test_copy_rows_empty(device) -> None:
    src = torch.empty(0, 4, device=device)
    copy_rows(src, torch.empty(0, 4, device=device))
    copy_rows(torch.ones(3, 4, device=device), torch.empty(2, 4, device=device), src_index=src.new_empty(0).long())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_combine_reduce_adds_in_rank_order(device, dtype) -> None:
    """index_add_ per rank into fp32 zeros, also with NaN/inf rows, tokens nobody returns and empty ranks."""
    g = torch.Generator().manual_seed(5)
    counts = [4, 0, 6, 3]
    tokens = 7
    token = torch.cat([torch.randperm(tokens, generator=g)[:c] for c in counts]).to(device)
    values = (torch.randn(sum(counts), 33, generator=g) * 1e3).to(dtype)
    values[1, 0], values[5, 3], values[6, 3] = float("nan"), float("inf"), -float("inf")
    values[2, 1] = -0.0
    prefix = random_bytes(values.shape[0], 12, 6, "cpu")  # the values start after other columns
    buf = torch.cat([prefix, values.view(torch.uint8)], dim=1).to(device)
    expected = torch.zeros(tokens, 33, device=device)
    for chunk_token, chunk in zip(token.split(counts), values.to(device).split(counts), strict=True):
        expected.index_add_(0, chunk_token, chunk.float())
    got = combine_reduce(buf, dtype, 33, token, counts, tokens, src_offset=12)
    assert_bitwise_equal(got, expected)


def test_weighted_rows_sum_matches_the_slot_loop(device) -> None:
    y = torch.randn(12, 40, device=device).to(torch.bfloat16)
    row_of = torch.tensor([[3, -1, 7], [0, 11, -1], [-1, -1, -1], [5, 5, 2]], device=device)
    weights = torch.rand(4, 3, device=device)
    expected = torch.zeros(4, 40, device=device)
    for k in range(3):
        term = weights[:, k, None] * y[row_of[:, k].clamp(min=0)].float()
        expected = expected + torch.where(row_of[:, k, None] >= 0, term, torch.zeros_like(term))
    assert_bitwise_equal(weighted_rows_sum(y, row_of, weights), expected.to(torch.bfloat16))


def test_bad_input_names_the_argument(device) -> None:
    src, dst = torch.zeros(4, 8, device=device), torch.zeros(4, 8, device=device)
    with pytest.raises(ValueError, match="row_bytes=40"):
        copy_rows(src, dst, row_bytes=40)
    with pytest.raises(ValueError, match="src_index/dst_index: lengths differ"):
        copy_rows(src, dst, src_index=torch.zeros(2, dtype=torch.int64, device=device),
                  dst_index=torch.zeros(3, dtype=torch.int64, device=device))  # fmt: skip
    with pytest.raises(TypeError, match="src_index: expected dtype int64"):
        copy_rows(src, dst, src_index=torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="dst: 4 rows, 6 to copy"):
        copy_rows(torch.zeros(6, 8, device=device), dst)
    with pytest.raises(ValueError, match="rank_counts"):
        combine_reduce(torch.zeros(3, 8, dtype=torch.uint8, device=device), torch.float32, 2,
                       torch.zeros(3, dtype=torch.int64, device=device), [1, 1], 4)  # fmt: skip
    with pytest.raises(ValueError, match="float32 values at byte 2 of 12-byte rows are not aligned"):
        combine_reduce(torch.zeros(3, 12, dtype=torch.uint8, device=device), torch.float32, 2,
                       torch.zeros(3, dtype=torch.int64, device=device), [3], 4, src_offset=2)  # fmt: skip
    if device.type == "cpu":  # index values are checked on the CPU (a GPU skips such rows)
        with pytest.raises(ValueError, match=r"src_index: values must lie in \[-1, 4\)"):
            copy_rows(src, dst, src_index=torch.tensor([0, 4]))
        with pytest.raises(ValueError, match="dst_index: row 1 appears twice"):
            copy_rows(src, dst, dst_index=torch.tensor([1, 1]))
        with pytest.raises(ValueError, match="token: row 2 appears twice"):
            combine_reduce(torch.zeros(2, 8, dtype=torch.uint8), torch.float32, 2, torch.tensor([2, 2]), [2], 4)
