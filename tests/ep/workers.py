"""What each rank runs in tests/ep (imported by the spawned processes). Every rank rebuilds every rank's inputs from
seeded generators, so it can compute, in plain torch, exactly what it must receive."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch

from dsv3.ep import Buffer


@dataclass
class Case:
    seed: int
    tokens: list[int]  # tokens of each rank (uneven, possibly 0)
    topk: int
    experts_per_rank: int
    hidden: int
    dtype: torch.dtype
    no_expert: float  # probability of a -1 slot
    only_rank0: bool = False  # route every token to rank 0's experts: every other rank receives nothing
    alignment: int = 1


def case_inputs(case: Case, src: int, world: int):
    """Rank src's (x, topk_idx, topk_weights); x[t, c] encodes (src, t, c) exactly in case.dtype."""
    g = torch.Generator().manual_seed(case.seed * 100 + src)
    n, e = case.tokens[src], case.experts_per_rank * world
    pool = case.experts_per_rank if case.only_rank0 else e
    idx = torch.stack([torch.randperm(pool, generator=g)[: case.topk] for _ in range(n)]) if n else None
    idx = idx if idx is not None else torch.empty(0, case.topk, dtype=torch.int64)
    idx[torch.rand(idx.shape, generator=g) < case.no_expert] = -1
    weights = torch.rand(idx.shape, generator=g)
    t = torch.arange(n, dtype=torch.float32)[:, None]
    c = torch.arange(case.hidden, dtype=torch.float32)[None, :]
    # Small integers are exact in bf16 / fp16.
    x = 100000 * src + 100 * t + c if case.dtype == torch.float32 else (src * 37 + t * 5 + c) % 251
    return x.to(case.dtype), idx, weights


def reference_layout(idx: torch.Tensor, e: int, world: int):
    """Per-token loops: (tokens per rank, tokens per expert, is_token_in_rank)."""
    per_rank = [0] * world
    per_expert = [0] * e
    in_rank = torch.zeros(idx.shape[0], world, dtype=torch.bool)
    for t, row in enumerate(idx.tolist()):
        ranks = {v // (e // world) for v in row if v >= 0}
        for v in row:
            if v >= 0:
                per_expert[v] += 1
        for r in ranks:
            per_rank[r] += 1
            in_rank[t, r] = True
    return per_rank, per_expert, in_rank


def expected_receive(case: Case, rank: int, world: int):
    """(x rows, local topk_idx, weights) rank must receive: sources in rank order, tokens ascending."""
    lo, hi = rank * case.experts_per_rank, (rank + 1) * case.experts_per_rank
    xs, idxs, ws = [], [], []
    for src in range(world):
        x, idx, w = case_inputs(case, src, world)
        for t in range(idx.shape[0]):
            row = idx[t].tolist()
            if any(lo <= v < hi for v in row):
                xs.append(x[t])
                idxs.append([v - lo if lo <= v < hi else -1 for v in row])
                ws.append([float(w[t, k]) if lo <= v < hi else 0.0 for k, v in enumerate(row)])
    h = case.hidden
    return (
        torch.stack(xs) if xs else torch.empty(0, h, dtype=case.dtype),
        torch.tensor(idxs, dtype=torch.int64).reshape(-1, case.topk),
        torch.tensor(ws, dtype=torch.float32).reshape(-1, case.topk),
    )


def assert_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}"
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{what}: bits differ"


def check_case(buffer: Buffer, case: Case, rank: int, world: int) -> None:
    e = case.experts_per_rank * world
    x, idx, w = case_inputs(case, rank, world)

    per_rank, rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(idx, e)
    ref_rank, ref_expert, ref_in_rank = reference_layout(idx, e, world)
    assert rdma is None and event is None
    assert per_rank.dtype == torch.int32 and per_rank.tolist() == ref_rank
    assert per_expert.dtype == torch.int32 and per_expert.tolist() == ref_expert
    assert torch.equal(in_rank, ref_in_rank)

    recv_x, recv_idx, recv_w, per_local, handle, event = buffer.dispatch(
        x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, expert_alignment=case.alignment,
    )  # fmt: skip
    want_x, want_idx, want_w = expected_receive(case, rank, world)
    assert_bits(recv_x, want_x, "recv_x")
    assert recv_idx.dtype == idx.dtype and torch.equal(recv_idx.long(), want_idx)
    assert_bits(recv_w, want_w, "recv_topk_weights")
    counts = torch.bincount(want_idx[want_idx >= 0], minlength=case.experts_per_rank)
    assert per_local == ((counts + case.alignment - 1) // case.alignment * case.alignment).tolist()
    assert event is None

    # Every rank sends back what it received: each token comes back once per rank it reached.
    combined, combined_w, event = buffer.combine(recv_x, handle, topk_weights=recv_w)
    reached = ref_in_rank.sum(1, keepdim=True).float()
    assert_bits(combined, (x.float() * reached).to(case.dtype), "combined_x")
    assert_bits(combined_w, torch.where(idx >= 0, w, torch.zeros_like(w)), "combined_topk_weights")
    assert event is None

    again = buffer.dispatch(x, handle=handle)
    assert_bits(again[0], want_x, "cached recv_x")
    assert again[1:4] == (None, None, None) and again[4] is handle

    # FP8 payload with arbitrary bits (NaN patterns included) and its scales: bit-exact both ways.
    g = torch.Generator().manual_seed(case.seed * 100 + rank + 50)
    q = torch.randint(0, 256, (idx.shape[0], case.hidden), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    scales = torch.rand(idx.shape[0], 2, generator=g)
    (recv_q, recv_s), *_ = buffer.dispatch((q, scales), handle=handle)
    assert recv_q.dtype == torch.float8_e4m3fn and recv_q.shape == (handle.num_recv_tokens, case.hidden)
    back, _, _ = buffer.combine(recv_s, handle)  # scales sum back like any float rows
    assert_bits(back, scales * ref_in_rank.sum(1, keepdim=True).float(), "combined scales")
    expect_q, expect_s = [], []
    lo, hi = rank * case.experts_per_rank, (rank + 1) * case.experts_per_rank
    for src in range(world):
        gs = torch.Generator().manual_seed(case.seed * 100 + src + 50)
        _, sidx, _ = case_inputs(case, src, world)
        sq = torch.randint(0, 256, (sidx.shape[0], case.hidden), dtype=torch.uint8, generator=gs)
        ss = torch.rand(sidx.shape[0], 2, generator=gs)
        keep = ((sidx >= lo) & (sidx < hi)).any(1)
        expect_q.append(sq[keep])
        expect_s.append(ss[keep])
    assert_bits(recv_q.view(torch.uint8), torch.cat(expect_q), "recv FP8 payload")
    assert_bits(recv_s, torch.cat(expect_s), "recv scales")


CASES = [
    Case(seed=1, tokens=[5, 0, 17, 3], topk=3, experts_per_rank=2, hidden=16, dtype=torch.float32, no_expert=0.2),
    Case(
        seed=2,
        tokens=[9, 4, 1, 12],
        topk=4,
        experts_per_rank=4,
        hidden=32,
        dtype=torch.bfloat16,
        no_expert=0.1,
        alignment=4,
    ),
    Case(
        seed=3,
        tokens=[6, 6, 6, 6],
        topk=2,
        experts_per_rank=2,
        hidden=8,
        dtype=torch.float16,
        no_expert=0,
        only_rank0=True,
    ),
    Case(seed=4, tokens=[7, 2, 0, 5], topk=2, experts_per_rank=3, hidden=8, dtype=torch.float32, no_expert=1.0),
    # An odd hidden size: packed columns are padded so that every tensor stays aligned.
    Case(seed=5, tokens=[3, 6, 1, 0], topk=3, experts_per_rank=2, hidden=5, dtype=torch.bfloat16, no_expert=0.1),
]


def dispatch_combine(rank: int, world: int) -> None:
    buffer = Buffer()
    assert (buffer.rank, buffer.group_size) == (rank, world)
    for case in CASES:
        check_case(buffer, case, rank, world)


def bad_input(rank: int, world: int) -> None:
    """Every case raises a ValueError on every rank, and the group stays usable afterwards."""
    buffer = Buffer()
    e = 2 * world
    x, idx, w = case_inputs(CASES[0], rank, world)
    with pytest.raises(ValueError, match="not divisible by the world size"):
        buffer.get_dispatch_layout(idx, e + 1)
    with pytest.raises(ValueError, match=r"topk_idx: values must lie in \[-1, 4\)" if world == 2 else "topk_idx"):
        buffer.get_dispatch_layout(torch.full_like(idx, e) if idx.numel() else torch.full((1, 3), e), e)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, e)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    with pytest.raises(ValueError, match="topk_weights: expected float32"):
        buffer.dispatch(x, topk_idx=idx, topk_weights=w[:, :1], **layout)
    with pytest.raises(ValueError, match="x: expected"):
        buffer.dispatch(x[:, None], topk_idx=idx, topk_weights=w, **layout)
    # Only rank 1 is wrong (an expert id out of range): every rank raises, none deadlocks.
    bad_idx = idx
    if rank == 1:  # CASES[0] gives rank 1 no tokens: give it one, routed to a non-existent expert
        x, bad_idx, w = torch.zeros(1, x.shape[1]), torch.full((1, 3), e + 7), torch.rand(1, 3)
        layout["is_token_in_rank"] = torch.zeros(1, world, dtype=torch.bool)
    with pytest.raises(ValueError, match="topk_idx: values" if rank == 1 else r"rank\(s\) \[1\]"):
        buffer.dispatch(x, topk_idx=bad_idx, topk_weights=w, **layout)
    x, idx, w = case_inputs(CASES[0], rank, world)
    narrow = x[:, :8] if rank == 1 else x  # ranks disagree on the hidden size: the payload rows differ in width
    with pytest.raises(ValueError, match="ranks disagree on row bytes"):
        buffer.dispatch(narrow, topk_idx=idx, topk_weights=w, **dict(layout, is_token_in_rank=in_rank))
    check_case(buffer, CASES[0], rank, world)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, e)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
    )  # fmt: skip
    with pytest.raises(ValueError, match="x: expected"):
        buffer.combine(torch.zeros(recv_x.shape[0] + 1, recv_x.shape[1]), handle)
    with pytest.raises(ValueError, match="the handle is for"):
        buffer.dispatch(torch.zeros(x.shape[0] + 1, x.shape[1]), handle=handle)


def rank1_dies(rank: int, world: int) -> None:
    if rank == 1:
        os._exit(3)
    dispatch_combine(rank, world)


def rank1_hangs(rank: int, world: int) -> None:
    if rank == 1:
        time.sleep(600)
    dispatch_combine(rank, world)


LL_CASE = Case(seed=7, tokens=[5, 3, 8, 0], topk=3, experts_per_rank=2, hidden=128, dtype=torch.bfloat16, no_expert=0.2)
LL_MAX_TOKENS = 8


def low_latency(rank: int, world: int) -> None:
    """The low-latency path against the normal one: same rows per expert, same counts, same combined sums."""
    from dsv3.ops.quant import per_token_group_quant_fp8

    buffer = Buffer()
    case, t_max = LL_CASE, LL_MAX_TOKENS
    e, local = case.experts_per_rank * world, case.experts_per_rank
    x, idx, w = case_inputs(case, rank, world)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, e)
    recv_x, recv_idx, recv_w, per_local, handle, _ = buffer.dispatch(
        x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
    )  # fmt: skip

    packed, count, ll_handle, event, hook = buffer.low_latency_dispatch(x, idx, t_max, e, use_fp8=False)
    assert event is None and hook is None
    assert packed.shape == (local, t_max * world, case.hidden) and count.dtype == torch.int32
    assert count.tolist() == per_local
    (q, scales), fp8_count, _, _, _ = buffer.low_latency_dispatch(x, idx, t_max, e, use_fp8=True)
    assert torch.equal(fp8_count, count)
    for expert in range(local):
        rows = recv_x[(recv_idx == expert).any(1)]
        c = rows.shape[0]
        assert_bits(packed[expert, :c], rows, f"expert {expert} rows")
        want_q, want_s = per_token_group_quant_fp8(rows)
        assert_bits(q[expert, :c], want_q, f"expert {expert} FP8 rows")
        assert_bits(scales[expert, :c], want_s, f"expert {expert} scales")

    # Expert "compute": scale each row by (global expert id + 1), in the activation dtype.
    scale = (rank * local + torch.arange(local, dtype=torch.float32) + 1)[:, None, None]
    y = (packed.float() * scale).to(case.dtype)
    combined, event, hook = buffer.low_latency_combine(y, idx, w, ll_handle)
    assert event is None and hook is None
    want = torch.zeros(x.shape[0], case.hidden)
    for k in range(case.topk):
        out_k = (x.float() * (idx[:, k, None].float() + 1)).to(case.dtype).float()
        want = want + torch.where(idx[:, k, None] >= 0, w[:, k, None] * out_k, torch.zeros_like(out_k))
    assert_bits(combined, want.to(case.dtype), "low_latency_combine")

    # The normal path: each rank weights its local experts' outputs, combine adds the ranks up.
    partial = torch.zeros(recv_x.shape[0], case.hidden)
    for k in range(case.topk):
        mine = recv_idx[:, k, None] >= 0
        out_k = (recv_x.float() * (rank * local + recv_idx[:, k, None].float() + 1)).to(case.dtype).float()
        partial = partial + torch.where(mine, recv_w[:, k, None] * out_k, torch.zeros_like(out_k))
    normal, _, _ = buffer.combine(partial, handle)
    torch.testing.assert_close(combined.float(), normal, rtol=1e-2, atol=1e-2)

    # Too many tokens on rank 1, then an expert out of range on rank 0: every rank raises, and the group still works.
    extra = torch.zeros(t_max + 1, case.hidden, dtype=case.dtype), torch.zeros(t_max + 1, case.topk, dtype=torch.int64)
    args = extra if rank == 1 else (x, idx)
    with pytest.raises(ValueError, match="more than num_max" if rank == 1 else r"rank\(s\) \[1\]"):
        buffer.low_latency_dispatch(*args, t_max, e, use_fp8=False)
    bad = torch.full_like(idx, e) if rank == 0 else idx
    with pytest.raises(ValueError, match="topk_idx: values" if rank == 0 else r"rank\(s\) \[0\]"):
        buffer.low_latency_dispatch(x, bad, t_max, e)
    if idx.numel():  # a local check: ranks without tokens have nothing that could differ
        with pytest.raises(ValueError, match="differs from the topk_idx"):
            buffer.low_latency_combine(y, torch.full_like(idx, -1), w, ll_handle)
    again = buffer.low_latency_dispatch(x, idx, t_max, e, use_fp8=False)[0]
    for expert, c in enumerate(count.tolist()):  # rows past an expert's count are unspecified
        assert_bits(again[expert, :c], packed[expert, :c], f"expert {expert} rows again")


def asynchronous(rank: int, world: int) -> None:
    """async_finish: outputs bit-identical to the synchronous calls, filled at event.wait(); the calls return while
    a peer has not even entered the collective (so computation overlaps it); errors surface at wait on every rank."""
    from dsv3.ep import EventOverlap

    buffer = Buffer()
    for case in CASES[:2]:
        e = case.experts_per_rank * world
        x, idx, w = case_inputs(case, rank, world)
        per_rank, _, per_expert, in_rank, event = buffer.get_dispatch_layout(idx, e, async_finish=True)
        assert isinstance(event, EventOverlap)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        args = dict(topk_idx=idx, topk_weights=w, expert_alignment=case.alignment, **layout)
        want = buffer.dispatch(x, **args)
        got = buffer.dispatch(x, previous_event=event, async_finish=True, **args)
        got[5].current_stream_wait()
        for a, b, what in zip(got[:3], want[:3], ("recv_x", "recv_topk_idx", "recv_topk_weights"), strict=True):
            assert_bits(a, b, f"async {what}")
        assert got[3] == want[3], "async num_recv_tokens_per_expert_list"
        handle = want[4]
        want_c = buffer.combine(want[0], handle, topk_weights=want[2])
        got_c = buffer.combine(got[0], got[4], topk_weights=got[2], async_finish=True)
        got_c[2].wait()
        assert_bits(got_c[0], want_c[0], "async combined_x")
        assert_bits(got_c[1], want_c[1], "async combined_topk_weights")

    # Overlap: rank 1 enters the exchange a second late; rank 0's calls return at once and it computes meanwhile.
    case = CASES[0]
    e = case.experts_per_rank * world
    x, idx, w = case_inputs(case, rank, world)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, e)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
    )  # fmt: skip
    if rank == 1:
        time.sleep(1.0)
    start = time.monotonic()
    again, _, _, _, _, event = buffer.dispatch(x, handle=handle, async_finish=True)
    if rank == 0:
        assert time.monotonic() - start < 0.5, "an asynchronous dispatch waited for its peers"
        assert not event.is_done()
        a = torch.randn(128, 128)
        for _ in range(20):  # computation while the rows are in flight
            a = torch.tanh(a @ a)
    event.wait()
    assert event.is_done()
    assert_bits(again, recv_x, "overlapped cached dispatch")
    if rank == 1:
        time.sleep(1.0)
    start = time.monotonic()
    back, _, event = buffer.combine(recv_x, handle, async_finish=True)
    if rank == 0:
        assert time.monotonic() - start < 0.5, "an asynchronous combine waited for its peers"
    event.wait()
    reached = in_rank.sum(1, keepdim=True).float()
    assert_bits(back, (x.float() * reached).to(case.dtype), "overlapped combine")

    # Low latency: the event and the receive hook are the same completion; results equal the synchronous path.
    case, t_max = LL_CASE, LL_MAX_TOKENS
    e = case.experts_per_rank * world
    x, idx, w = case_inputs(case, rank, world)
    (q, s), count, ll_handle, _, _ = buffer.low_latency_dispatch(x, idx, t_max, e)
    (aq, a_s), a_count, a_handle, event, hook = buffer.low_latency_dispatch(
        x, idx, t_max, e, async_finish=True, return_recv_hook=True
    )
    assert event is hook
    hook()
    for expert, c in enumerate(count.tolist()):
        assert_bits(aq[expert, :c].view(torch.uint8), q[expert, :c].view(torch.uint8), "async low-latency FP8 rows")
        assert_bits(a_s[expert, :c], s[expert, :c], "async low-latency scales")
    assert torch.equal(a_count, count) and torch.equal(a_handle.packed_slot, ll_handle.packed_slot)
    y = (q.float() * 0.5).to(torch.bfloat16)
    want_y = buffer.low_latency_combine(y, idx, w, ll_handle)[0]
    got_y, event, hook = buffer.low_latency_combine(y, idx, w, a_handle, async_finish=True)
    assert hook is None
    event.wait()
    assert_bits(got_y, want_y, "async low_latency_combine")
    # Bad input on rank 1 surfaces when the exchange is waited for, on every rank.
    too_many = torch.zeros(t_max + 1, case.hidden, dtype=case.dtype), torch.zeros(t_max + 1, case.topk).long()
    args = too_many if rank == 1 else (x, idx)
    *_, event, _ = buffer.low_latency_dispatch(*args, t_max, e, use_fp8=False, async_finish=True)
    with pytest.raises(ValueError, match="more than num_max" if rank == 1 else r"rank\(s\) \[1\]"):
        event.wait()
    with pytest.raises(TypeError, match="previous_event: expected an EventOverlap"):
        buffer.get_dispatch_layout(idx, e, previous_event=object())
