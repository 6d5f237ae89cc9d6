"""Rows of several tensors travel as one uint8 tensor through one all_to_all_single.

Byte rows let any dtype cross any backend (gloo and NCCL refuse float8; gloo is picky about bfloat16) and let the
payload, its scales and its routing share a single collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def row_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.shape[1] * t.element_size() for t in tensors)


def pack_rows(tensors: list[torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
    """[N, c_i] tensors -> uint8 [N, Σ c_i * itemsize_i]; with rows (int64 [S]), only those rows, in that order."""
    parts = []
    for t in tensors:
        t = t if rows is None else t.index_select(0, rows)
        parts.append(t.contiguous().view(torch.uint8))  # [N, c] -> [N, c * itemsize]
    return torch.cat(parts, dim=1)


def unpack_rows(buf: torch.Tensor, like: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Inverse of pack_rows: uint8 [M, bytes] -> one [M, cols] tensor per (dtype, cols) of like."""
    out, offset = [], 0
    for dtype, cols in like:
        width = cols * torch.empty(0, dtype=dtype).element_size()
        out.append(buf[:, offset : offset + width].contiguous().view(dtype))
        offset += width
    return out


def exchange_rows(buf: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    """Send rows [Σ send_counts[j]] of buf, grouped by destination rank j; receive rows grouped by source rank."""
    out = buf.new_empty(sum(recv_counts), buf.shape[1])
    dist.all_to_all_single(out, buf, recv_counts, send_counts, group=group)
    return out
