"""Packing kernels of expert parallelism (dsv3.ep): byte-row copies between tensors and the exchange buffer, and the
reductions that add returned rows up at their source tokens. CPU and CUDA kernels, bit-exact with torch index ops.

Rows are handled as bytes: a 2-D contiguous tensor [N, C] of any dtype is N rows of C * itemsize bytes, and a copy
moves a span of bytes from a column offset of each source row to a column offset of each destination row. That is
how the payload, its FP8 scales and the routing share one uint8 buffer and one all_to_all_single.
"""

from __future__ import annotations

import torch

from dsv3.ops.extension import DTYPE_CODES, FLOAT_DTYPES, run_kernel
from dsv3.ops.tensor_checks import check_tensor

ANY_DTYPES = (
    torch.uint8,
    torch.int8,
    torch.int32,
    torch.int64,
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float8_e4m3fn,
)


def _row_bytes(t: torch.Tensor) -> int:
    return t.shape[1] * t.element_size()


def _index(index: torch.Tensor | None, name: str, device: torch.device) -> tuple[int, int]:
    """(address, length) of an optional int64 [rows] index; (0, -1) for None."""
    if index is None:
        return 0, -1
    check_tensor(index, name, dtypes=(torch.int64,), ndim=1, device=device)
    return index.data_ptr(), index.shape[0]


def copy_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    *,
    src_index: torch.Tensor | None = None,
    dst_index: torch.Tensor | None = None,
    src_offset: int = 0,
    dst_offset: int = 0,
    row_bytes: int | None = None,
) -> torch.Tensor:
    """dst row d(i), bytes [dst_offset, dst_offset + row_bytes) = src row s(i), bytes [src_offset, ...), in place.

    src [S, *], dst [D, *]: 2-D contiguous tensors of any dtype on one device. s(i) = src_index[i] (int64, -1 = skip
    the row) or i; d(i) = dst_index[i] (int64, -1 = skip; the others distinct) or i; i runs over the index given
    (both: equal lengths), else over the S rows. row_bytes defaults to the rest of the narrower row. Returns dst.
    Index values beyond the rows raise on the CPU and skip the row on a GPU.
    """
    check_tensor(src, "src", dtypes=ANY_DTYPES, ndim=2)
    check_tensor(dst, "dst", dtypes=ANY_DTYPES, ndim=2, device=src.device)
    src_address, src_rows = _index(src_index, "src_index", src.device)
    dst_address, dst_rows = _index(dst_index, "dst_index", src.device)
    if src_rows >= 0 and dst_rows >= 0 and src_rows != dst_rows:
        raise ValueError(f"src_index/dst_index: lengths differ ({src_rows} vs {dst_rows})")
    rows = max(src_rows, dst_rows) if max(src_rows, dst_rows) >= 0 else src.shape[0]
    src_stride, dst_stride = _row_bytes(src), _row_bytes(dst)
    if row_bytes is None:
        row_bytes = min(src_stride - src_offset, dst_stride - dst_offset)
    for name, value in (("src_offset", src_offset), ("dst_offset", dst_offset), ("row_bytes", row_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    if src_offset + row_bytes > src_stride or dst_offset + row_bytes > dst_stride:
        raise ValueError(
            f"row_bytes={row_bytes}: spans [{src_offset}, {src_offset + row_bytes}) of {src_stride}-byte src rows and "
            f"[{dst_offset}, {dst_offset + row_bytes}) of {dst_stride}-byte dst rows must fit"
        )
    if src_index is None and rows > src.shape[0]:
        raise ValueError(f"src: {src.shape[0]} rows, {rows} to copy without a src_index")
    if dst_index is None and rows > dst.shape[0]:
        raise ValueError(f"dst: {dst.shape[0]} rows, {rows} to copy without a dst_index")
    run_kernel(
        "ep_copy_rows", src.device, src.data_ptr(), dst.data_ptr(), src_address, dst_address, rows, src.shape[0],
        dst.shape[0], src_stride, dst_stride, src_offset, dst_offset, row_bytes,
    )  # fmt: skip
    return dst


def combine_reduce(
    src: torch.Tensor,
    dtype: torch.dtype,
    cols: int,
    token: torch.Tensor,
    rank_counts: list[int],
    num_tokens: int,
    src_offset: int = 0,
) -> torch.Tensor:
    """fp32 [num_tokens, cols]: out[token[i]] += row i's cols values of `dtype` (from byte src_offset), rows in order.

    src: uint8 [M, W], rows grouped by source rank (rank_counts rows each, sum M); token: int64 [M] in
    [0, num_tokens), distinct within a rank's rows. Each element is +0 plus its rows in rank order, in fp32: the
    bits of index_add_ per rank into fp32 zeros.
    """
    check_tensor(src, "src", dtypes=(torch.uint8,), ndim=2)
    check_tensor(token, "token", dtypes=(torch.int64,), shape=(src.shape[0],), device=src.device)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32, bfloat16 or float16, got {dtype}")
    if sum(rank_counts) != src.shape[0] or any(c < 0 for c in rank_counts):
        raise ValueError(f"rank_counts: {rank_counts} must be non-negative and add up to the {src.shape[0]} rows")
    offsets = torch.tensor([0, *rank_counts], dtype=torch.int64).cumsum(0)  # read on the host
    out = torch.empty(num_tokens, cols, dtype=torch.float32, device=src.device)
    run_kernel(
        "ep_combine_reduce", src.device, src.data_ptr(), DTYPE_CODES[dtype], token.data_ptr(), offsets.data_ptr(),
        out.data_ptr(), src.shape[0], num_tokens, cols, len(rank_counts), src.shape[1], src_offset,
    )  # fmt: skip
    return out


def weighted_rows_sum(y: torch.Tensor, row_of: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[T, H] in y's dtype: out[t] = Σ_k weights[t, k] * y[row_of[t, k]] in fp32 from +0 in slot order, rounded
    once; row_of -1 adds nothing. y [R, H] float; row_of int64 [T, k]; weights f32 [T, k]. (The MoE unpermutation
    kernel: returned expert outputs are added up exactly as a single process adds its experts' outputs.)"""
    from dsv3.ops.moe import _unpermute

    check_tensor(y, "y", dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(row_of, "row_of", dtypes=(torch.int64,), ndim=2, device=y.device)
    check_tensor(weights, "weights", dtypes=(torch.float32,), shape=tuple(row_of.shape), device=y.device)
    return _unpermute(y, row_of, weights)
