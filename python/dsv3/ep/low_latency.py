"""Low-latency (decode) dispatch and combine: fixed-size exchanges into the masked per-expert layout.

Sizes never depend on the routing, so no count exchange and no split lists are needed (T =
num_max_dispatch_tokens_per_rank, k = top-k, L = experts per rank, R = ranks):

* dispatch: every rank sends every rank T + 1 rows. Row i of the block for rank j is the i-th of the sender's
  tokens (ascending) with an expert on j: the token index (8 bytes, -1 for an unused row), the local ids of its
  experts there in slot order (k int32, -1 padded), then the payload (FP8 values and scales, or x's dtype). The
  last row is a header whose first 8 bytes carry the sender's input-error flag, so bad input on one rank raises on
  every rank. A token crosses to a rank once, however many of its experts live there.
* On arrival each (row, listed expert) entry is copied to the front of that expert's slab of [L, T*R, H], by source
  rank, then token; the rows after them are unspecified.
* combine: every rank returns to every rank T * k rows: row (i, j) holds the output of the j-th listed expert for
  the i-th token that rank received from it; the source adds its k weighted outputs in slot order.

Nothing here reads device data on the host when the tensors are on a GPU (no synchronization; capturable in a CUDA
graph). Bad input is then reported through the handle instead of raised: an expert id outside [-1, E) takes no
expert, and handle.errors (int32 [1] on the device) counts the ranks whose input had such ids or too many tokens.
On the CPU the checks read the data and raise ValueError on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3.ep.event import EventOverlap
from dsv3.ep.layout import check_num_experts, check_topk_idx
from dsv3.ops.ep import copy_rows, weighted_rows_sum

QUANT_GROUP = 128


class ValueProblem(ValueError):
    """Bad values (not shapes) in one rank's input: reported to every rank through the header row."""


@dataclass
class LowLatencyHandle:
    """What low_latency_combine needs from low_latency_dispatch.

    packed_slot: int64 [L * T*R], for each packed row its row (src * T + i) * k + j in the [R, T*k] return
    exchange, -1 if unused. return_row: int64 [N, k], for each (token, slot) with an expert the row of the received
    return that holds its output, -1 for no expert. topk_idx: int64 [N, k] as dispatched. errors: int32 [1], the
    ranks that sent bad input (always 0 on the CPU, where bad input raises).
    """

    packed_slot: torch.Tensor
    return_row: torch.Tensor
    topk_idx: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    errors: torch.Tensor


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
    device = x.device
    g = topk_idx.long()
    problem = None
    if device.type == "cuda":  # only what the host knows without reading the device: the token count
        if n > max_tokens:
            problem = ValueProblem(f"x: {n} tokens, more than num_max_dispatch_tokens_per_rank={max_tokens}")
        in_range = (g >= -1) & (g < num_experts)
        flag = (~in_range).any() | (problem is not None)
        g = torch.where(in_range, g, -1)  # an id out of range takes no expert
    else:
        try:
            _check_values(x, topk_idx, max_tokens, num_experts)
        except ValueProblem as error:
            problem = error
        flag = torch.tensor(problem is not None)
    if problem is not None:
        g = torch.full_like(g, -1)  # nothing is sent; the flag tells the other ranks
    if use_fp8:
        from dsv3.ops.quant import per_token_group_quant_fp8

        parts = list(per_token_group_quant_fp8(x, QUANT_GROUP, ue8m0=round_scale))
    else:
        parts = [x]
    k = g.shape[1]
    lead = 8 + 4 * k  # token index, then the local expert ids
    width = lead + sum(t.shape[1] * t.element_size() for t in parts)
    block = max_tokens + 1  # rows per destination, the last one the header
    send = torch.full((r * block, width), 255, dtype=torch.uint8, device=device)  # token and experts -1 everywhere
    header = send.view(r, block, -1)[:, -1]
    header.zero_()
    header[:, :8] = flag.to(device=device, dtype=torch.int64).reshape(1).view(torch.uint8)
    valid = g >= 0
    dest = torch.where(valid, g // local, r)  # rank of each slot's expert; r (an extra column) for none
    on_rank = torch.zeros(n, r + 1, dtype=torch.int64, device=device).scatter_(1, dest, 1)[:, :r]
    row = on_rank.cumsum(0) - 1  # [N, R] the token's row in the block for each rank it reaches
    # Slot k's place among the token's slots bound for the same rank, in slot order.
    earlier = torch.ones(k, k, dtype=torch.bool, device=device).tril(-1)
    place = ((dest[:, :, None] == dest[:, None, :]) & valid[:, None, :] & earlier).sum(-1)
    # The local expert lists [N, R, k]; slots with no expert write into one extra element past the end.
    sink = n * r * k
    lists = torch.full((sink + 1,), -1, dtype=torch.int32, device=device)
    t_of = torch.arange(n, device=device)[:, None].expand(n, k)
    flat = (t_of * r + dest.clamp(max=r - 1)) * k + place
    lists.scatter_(0, torch.where(valid, flat, sink).reshape(-1), (g % local).int().reshape(-1))
    lists = lists[:sink].view(n, r, k)
    at = torch.where(on_rank.bool(), torch.arange(r, device=device) * block + row, -1).reshape(-1)  # (t, r)
    token_rank = torch.arange(n, device=device).repeat_interleave(r)  # the token of each (t, r)
    lead_rows = torch.cat([token_rank[:, None].view(torch.uint8), lists.view(n * r, k).view(torch.uint8)], 1)
    copy_rows(lead_rows, send, dst_index=at)
    offset = lead
    for t in parts:
        copy_rows(t, send, src_index=token_rank, dst_index=at, dst_offset=offset)
        offset += t.shape[1] * t.element_size()
    return_row = torch.where(valid, (dest.clamp(max=r - 1) * max_tokens + row.gather(1, dest.clamp(max=r - 1))) * k
                             + place, -1)  # fmt: skip

    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=async_op)
    capacity = max_tokens * r
    # Rows past an expert's count are left as they are (never zeroed: the [L, T*R, H] slabs are large and the masked
    # GEMM reads only the first recv_count[e] rows), as in DeepEP.
    out = [torch.empty(local * capacity, t.shape[1], dtype=t.dtype, device=device) for t in parts]
    recv_count = torch.zeros(local, dtype=torch.int32, device=device)
    packed_slot = torch.full((local * capacity,), -1, dtype=torch.int64, device=device)
    errors = torch.zeros(1, dtype=torch.int32, device=device)

    def finish() -> None:
        blocks = recv.view(r, block, -1)
        flags = blocks[:, -1, :8].contiguous().view(torch.int64)[:, 0]
        if device.type == "cuda":
            errors.copy_((flags != 0).sum().reshape(1))
        if problem is not None:
            raise problem
        if device.type != "cuda":
            bad = flags.nonzero()[:, 0].tolist()
            if bad:
                raise ValueError(f"low_latency_dispatch aborted: rank(s) {bad} of the group passed invalid input")
        body = blocks[:, :-1].reshape(r * max_tokens, -1)  # row q = src * T + i
        experts = body[:, 8:lead].contiguous().view(torch.int32).long()  # [R*T, k] local ids, -1 padded
        used = experts >= 0
        # Entry (q, j) goes to row `position` of its expert's slab: rows before it (in q order) for that expert.
        hot = torch.zeros(r * max_tokens, local + 1, dtype=torch.int64, device=device)
        hot.scatter_add_(1, torch.where(used, experts, local), used.long())
        hot = hot[:, :local]
        before = hot.cumsum(0) - hot
        position = before.gather(1, experts.clamp(min=0))
        target = torch.where(used, experts * capacity + position, -1).reshape(-1)  # [R*T*k]
        q_of = torch.arange(r * max_tokens, device=device).repeat_interleave(k)
        column = lead
        for t in out:
            copy_rows(body, t, src_index=q_of, dst_index=target, src_offset=column)
            column += t.shape[1] * t.element_size()
        # packed_slot[target] = entry number, for the used entries (the others write one element past the end).
        slots = torch.full((local * capacity + 1,), -1, dtype=torch.int64, device=device)
        entries = torch.arange(target.shape[0], device=device)
        slots.scatter_(0, torch.where(target >= 0, target, local * capacity), entries)
        packed_slot.copy_(slots[:-1])
        recv_count.copy_(hot.sum(0))

    views = [t.view(local, capacity, -1) for t in out]
    recv_x = (views[0], views[1]) if use_fp8 else views[0]
    handle = LowLatencyHandle(packed_slot, return_row, g, max_tokens, hidden, num_experts, errors)
    if async_op:
        return recv_x, recv_count, handle, EventOverlap(work, finish)
    finish()
    return recv_x, recv_count, handle, None


def low_latency_combine(x, topk_idx, topk_weights, handle: LowLatencyHandle, group, async_op=False):
    """See Buffer.low_latency_combine. Shapes are checked by the caller. Returns (combined_x, event): with async_op
    combined_x is filled by event.wait()."""
    r = dist.get_world_size(group)
    if x.device.type != "cuda" and not torch.equal(topk_idx.long(), handle.topk_idx):  # reading it would sync a GPU
        raise ValueError("topk_idx: differs from the topk_idx given to low_latency_dispatch")
    hidden, t, k = handle.hidden, handle.num_max_dispatch_tokens_per_rank, handle.topk_idx.shape[1]
    rows = x.reshape(-1, hidden)
    ret = torch.empty(r * t * k, hidden, dtype=x.dtype, device=x.device)  # rows nobody fills are never read
    copy_rows(rows.contiguous(), ret, dst_index=handle.packed_slot)  # each packed row to its return row
    back = torch.empty_like(ret)
    work = dist.all_to_all_single(back.view(torch.uint8), ret.view(torch.uint8), group=group, async_op=async_op)
    combined = torch.empty(topk_idx.shape[0], hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.contiguous()

    def finish() -> None:
        # The source adds its k weighted outputs in fp32 in slot order, as a single process adds its experts'.
        combined.copy_(weighted_rows_sum(back, handle.return_row, weights))

    if async_op:
        return combined, EventOverlap(work, finish)
    finish()
    return combined, None
