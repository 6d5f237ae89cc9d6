"""Rows of several tensors travel as one uint8 tensor through one all_to_all_single.

Byte rows let any dtype cross any backend (gloo and NCCL refuse float8; gloo is picky about bfloat16) and let the
payload, its scales and its routing share a single collective. Packing and unpacking are dsv3 kernels
(dsv3.ops.ep.copy_rows: one pass per tensor, straight between the tensor and its columns of the buffer).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsv3.ops.ep import copy_rows


def row_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.shape[1] * t.element_size() for t in tensors)


def pack_rows(tensors: list[torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
    """[N, c_i] tensors -> uint8 [N, Σ c_i * itemsize_i]; with rows (int64 [S]), only those rows, in that order."""
    count = tensors[0].shape[0] if rows is None else rows.shape[0]
    out = torch.empty(count, row_bytes(tensors), dtype=torch.uint8, device=tensors[0].device)
    offset = 0
    for t in tensors:
        copy_rows(t.contiguous(), out, src_index=rows, dst_offset=offset)
        offset += t.shape[1] * t.element_size()
    return out


def unpack_rows(buf: torch.Tensor, like: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Inverse of pack_rows: uint8 [M, bytes] -> one [M, cols] tensor per (dtype, cols) of like (a view of buf when
    one tensor fills the rows)."""
    if len(like) == 1 and buf.is_contiguous():
        return [buf.view(like[0][0])]
    out, offset = [], 0
    for dtype, cols in like:
        t = torch.empty(buf.shape[0], cols, dtype=dtype, device=buf.device)
        copy_rows(buf, t, src_offset=offset)
        out.append(t)
        offset += cols * t.element_size()
    return out


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
    offset = 0
    for t in outputs:
        copy_rows(buf, t, src_offset=offset)
        offset += t.shape[1] * t.element_size()
