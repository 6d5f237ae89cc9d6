"""Low-latency (decode) dispatch and combine: fixed-size exchanges into the masked per-expert layout.

Every rank sends every other rank one block of num_local_experts * T rows (T = num_max_dispatch_tokens_per_rank)
plus one header row, whatever the routing: the sizes never depend on data, so no count exchange and no split
lists are needed. Row i of block (rank j, local expert e) is the i-th of the sender's tokens routed to expert
j*L + e (ascending token order); a row's first 8 bytes hold that token's index, -1 for an unused row. The header
row's first 8 bytes carry the sender's input-error flag, so bad input on one rank raises on every rank.

On arrival, expert e's rows are packed to the front of its slab of [L, T*R, H], by source rank, then token.
Combine sends each packed row back to the place it came from, and the source adds up its k expert outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3.ep.event import EventOverlap
from dsv3.ep.layout import check_num_experts, check_topk_idx
from dsv3.ep.transport import pack_rows
from dsv3.ops.ep import copy_rows, weighted_rows_sum

QUANT_GROUP = 128


class ValueProblem(ValueError):
    """Bad values (not shapes) in one rank's input: reported to every rank through the header row."""


@dataclass
class LowLatencyHandle:
    """What low_latency_combine needs from low_latency_dispatch.

    packed_slot: int64 [L * T*R], for each packed row its flat index (src, e, i) in the [R, L, T] exchange, -1 if
    unused. position: int64 [N, k], index of (token, slot) among this rank's tokens routed to that expert, -1 for no
    expert. topk_idx: int64 [N, k] as dispatched.
    """

    packed_slot: torch.Tensor
    position: torch.Tensor
    topk_idx: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int


def _check_values(x: torch.Tensor, topk_idx: torch.Tensor, max_tokens: int, num_experts: int) -> None:
    if x.shape[0] > max_tokens:
        raise ValueProblem(f"x: {x.shape[0]} tokens, more than num_max_dispatch_tokens_per_rank={max_tokens}")
    try:
        check_topk_idx(topk_idx, num_experts)
    except ValueError as error:
        raise ValueProblem(str(error)) from None


def low_latency_dispatch(x, topk_idx, max_tokens, num_experts, use_fp8, round_scale, group, async_op=False):
    """See Buffer.low_latency_dispatch. Shapes and types are checked by the caller. Returns (recv_x, recv_count,
    handle, event): with async_op the outputs are filled, and bad input anywhere raised, by event.wait()."""
    r = dist.get_world_size(group)
    check_num_experts(num_experts, r)
    local, n, hidden = num_experts // r, x.shape[0], x.shape[1]
    problem = None
    try:
        _check_values(x, topk_idx, max_tokens, num_experts)
    except ValueProblem as error:
        problem = error
    if use_fp8:
        from dsv3.ops.quant import per_token_group_quant_fp8

        parts = list(per_token_group_quant_fp8(x, QUANT_GROUP, ue8m0=round_scale))
    else:
        parts = [x]
    token = torch.arange(n, dtype=torch.int64, device=x.device)[:, None]
    rows = pack_rows([token, *parts])  # [N, row bytes]
    block = local * max_tokens + 1  # rows per destination, the last one the header
    send = torch.full((r * block, rows.shape[1]), 255, dtype=torch.uint8, device=x.device)  # token -1 everywhere
    header = send.view(r, block, -1)[:, -1]
    header.zero_()
    header[:, :8] = torch.tensor([problem is not None], dtype=torch.int64).view(torch.uint8).to(x.device)

    g = topk_idx.long()
    valid = g >= 0
    if problem is None:
        # Index of each (token, slot) among this rank's tokens routed to the same expert.
        hot = torch.zeros(n, num_experts + 1, dtype=torch.int64, device=x.device)
        hot.scatter_(1, torch.where(valid, g, num_experts), 1)
        before = hot.cumsum(0) - hot
        position = torch.where(valid, before.gather(1, torch.where(valid, g, num_experts)), -1)
        dest = torch.where(valid, (g // local) * block + (g % local) * max_tokens + position, -1)
        source = torch.arange(n, device=x.device).repeat_interleave(g.shape[1])  # the token of each (token, slot)
        copy_rows(rows, send, src_index=source, dst_index=dest.reshape(-1))
    else:
        position = torch.full_like(g, -1)

    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=async_op)
    capacity = max_tokens * r
    out = [torch.zeros(local * capacity, t.shape[1], dtype=t.dtype, device=x.device) for t in parts]
    recv_count = torch.zeros(local, dtype=torch.int32, device=x.device)
    packed_slot = torch.full((local * capacity,), -1, dtype=torch.int64, device=x.device)

    def finish() -> None:
        blocks = recv.view(r, block, -1)
        bad = blocks[:, -1, :8].contiguous().view(torch.int64)[:, 0].nonzero()[:, 0].tolist()
        if problem is not None:
            raise problem
        if bad:
            raise ValueError(f"low_latency_dispatch aborted: rank(s) {bad} of the group passed invalid input")
        body = blocks[:, :-1].reshape(r, local, max_tokens, -1)  # [src, e, i, row bytes]
        src_token = body[..., :8].contiguous().view(torch.int64)[..., 0]  # [src, e, i]
        used = src_token >= 0
        count = used.sum(-1)  # [src, e]; a block's used rows come first
        offset = count.cumsum(0) - count
        i = torch.arange(max_tokens, device=x.device)
        e = torch.arange(local, device=x.device)
        packed_at = e[None, :, None] * capacity + offset[:, :, None] + i[None, None, :]  # [src, e, i]
        slots = body.reshape(r * local * max_tokens, -1)
        flat_used = used.reshape(-1)
        target = torch.where(flat_used, packed_at.reshape(-1), -1)  # packed row of each received slot, -1 if unused
        column = 8  # after the token index
        for t in out:
            copy_rows(slots, t, dst_index=target, src_offset=column)
            column += t.shape[1] * t.element_size()
        packed_slot[target[flat_used]] = flat_used.nonzero()[:, 0]
        recv_count.copy_(count.sum(0))

    views = [t.view(local, capacity, -1) for t in out]
    recv_x = (views[0], views[1]) if use_fp8 else views[0]
    handle = LowLatencyHandle(packed_slot, position, g, max_tokens, hidden, num_experts)
    if async_op:
        return recv_x, recv_count, handle, EventOverlap(work, finish)
    finish()
    return recv_x, recv_count, handle, None


def low_latency_combine(x, topk_idx, topk_weights, handle: LowLatencyHandle, group, async_op=False):
    """See Buffer.low_latency_combine. Shapes are checked by the caller. Returns (combined_x, event): with async_op
    combined_x is filled by event.wait()."""
    r = dist.get_world_size(group)
    if not torch.equal(topk_idx.long(), handle.topk_idx):
        raise ValueError("topk_idx: differs from the topk_idx given to low_latency_dispatch")
    hidden, t = handle.hidden, handle.num_max_dispatch_tokens_per_rank
    local = handle.num_experts // r
    rows = x.reshape(-1, hidden)
    ret = torch.zeros(r * local * t, hidden, dtype=x.dtype, device=x.device)
    copy_rows(rows.contiguous(), ret, dst_index=handle.packed_slot)  # each packed row back to its exchange slot
    back = torch.empty_like(ret)
    work = dist.all_to_all_single(back.view(torch.uint8), ret.view(torch.uint8), group=group, async_op=async_op)
    combined = torch.empty(topk_idx.shape[0], hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.contiguous()

    def finish() -> None:
        # Block (rank j, expert e) of the return holds expert j*L + e's outputs for this rank's tokens; the source
        # adds its k weighted outputs in fp32 in slot order, as a single process adds its experts' outputs.
        g = handle.topk_idx
        row_of = torch.where(g >= 0, g * t + handle.position, -1)
        combined.copy_(weighted_rows_sum(back, row_of, weights))

    if async_op:
        return combined, EventOverlap(work, finish)
    finish()
    return combined, None
