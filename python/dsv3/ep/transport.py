"""Rows of several tensors travel as one uint8 tensor through one all_to_all_single.

Byte rows let any dtype cross any backend (gloo and NCCL refuse float8; gloo is picky about bfloat16) and let the
payload, its scales and its routing share a single collective. Packing and unpacking are dsv3 kernels
(dsv3.ops.ep.copy_rows: one pass per tensor, straight between the tensor and its columns of the buffer).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsv3.ops.ep import copy_rows

# Each tensor's columns start on an ALIGN-byte boundary of the row (and rows are a multiple of ALIGN bytes), so
# the kernels read every element at its natural alignment whatever the widths (odd hidden sizes included).
ALIGN = 8


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def column_offsets(spans: list[tuple[torch.dtype, int]]) -> list[int]:
    """Byte offset of each (dtype, cols) tensor within a packed row."""
    offsets, offset = [], 0
    for dtype, cols in spans:
        offsets.append(offset)
        offset += _padded(cols * dtype.itemsize)
    return offsets


def row_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(_padded(t.shape[1] * t.element_size()) for t in tensors)


def pack_rows(tensors: list[torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
    """[N, c_i] tensors -> uint8 [N, row_bytes]: each tensor's row bytes from its column offset (padding bytes are
    unspecified); with rows (int64 [S]), only those rows, in that order."""
    count = tensors[0].shape[0] if rows is None else rows.shape[0]
    out = torch.empty(count, row_bytes(tensors), dtype=torch.uint8, device=tensors[0].device)
    for t, offset in zip(tensors, column_offsets([(t.dtype, t.shape[1]) for t in tensors]), strict=True):
        copy_rows(t.contiguous(), out, src_index=rows, dst_offset=offset)
    return out


def unpack_rows(buf: torch.Tensor, like: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Inverse of pack_rows: uint8 [M, bytes] -> one [M, cols] tensor per (dtype, cols) of like (a view of buf when
    one tensor fills the rows)."""
    if len(like) == 1 and buf.is_contiguous() and buf.shape[1] == like[0][1] * like[0][0].itemsize:
        return [buf.view(like[0][0])]
    outputs = [torch.empty(buf.shape[0], cols, dtype=dtype, device=buf.device) for dtype, cols in like]
    unpack_into(buf, outputs)
    return outputs


def exchange_rows(
    buf: torch.Tensor, send_counts: list[int], recv_counts: list[int], group, async_op: bool = False
) -> tuple[torch.Tensor, object]:
    """Send rows [Σ send_counts[j]] of buf, grouped by destination rank j; receive rows grouped by source rank.
    Returns (received rows, the collective's Work when async_op (its rows are valid after wait()), else None)."""
    out = buf.new_empty(sum(recv_counts), buf.shape[1])
    work = dist.all_to_all_single(out, buf, recv_counts, send_counts, group=group, async_op=async_op)
    return out, work


def unpack_into(buf: torch.Tensor, outputs: list[torch.Tensor]) -> None:
    """unpack_rows into existing tensors [M, c_i] (for asynchronous calls, whose outputs exist before their rows)."""
    for t, offset in zip(outputs, column_offsets([(t.dtype, t.shape[1]) for t in outputs]), strict=True):
        copy_rows(buf, t, src_offset=offset, row_bytes=t.shape[1] * t.element_size())
