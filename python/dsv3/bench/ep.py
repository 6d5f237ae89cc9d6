"""Expert-parallel dispatch and combine (dsv3.ep.Buffer) per world size, against one raw all_to_all_single moving the
same bytes in the same run: what the layout exchange, packing and unpacking cost on top of the transport.

Each world size runs in its own spawned processes: gloo ranks on the CPU, NCCL ranks on GPUs when there are at least
that many. DeepSeek-V3 routing sizes (H=7168, 256 experts, top-8, uniform random routing, so a token reaches most
ranks). A row's time is the median over repetitions of the slowest rank's time (a barrier before each); its bytes
are the payload rank 0 sends (rows times row bytes, its own share included), the bytes the raw baseline moves.
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv3.bench.harness import Report, Row, Timer

HIDDEN, EXPERTS, TOPK = 7168, 256, 8
SPAWN_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(fn, reps: int, device: torch.device) -> float:
    """Median over reps of the slowest rank's microseconds for fn() (every rank calls this together)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist()) * 1e6


def _raw_all_to_all(send: torch.Tensor, send_counts: list[int], recv_counts: list[int]):
    out = send.new_empty(sum(recv_counts), send.shape[1])
    return lambda: dist.all_to_all_single(out, send, recv_counts, send_counts)


def _measure(world: int, device: torch.device, tokens: int, ll_tokens: int, reps: int) -> list[dict]:
    from dsv3.ep import Buffer
    from dsv3.ep.transport import pack_rows
    from dsv3.ops.quant import per_token_group_quant_fp8

    buffer = Buffer()
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    idx = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOPK] for _ in range(tokens)]).to(device)
    weights = torch.rand(tokens, TOPK, generator=g).to(device)
    x = torch.randn(tokens, HIDDEN, generator=g).to(torch.bfloat16).to(device)
    x_fp8 = per_token_group_quant_fp8(x)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, EXPERTS)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=weights, **layout)
    case = f"R={world} T={tokens} H={HIDDEN} top-{TOPK}"
    rows = []

    def row(op: str, fn, payload: list[torch.Tensor], send_counts, recv_counts, rows_sent: torch.Tensor | None, note):
        send = pack_rows(payload, rows_sent)
        us = _time(fn, reps, device)
        base = _time(_raw_all_to_all(send, send_counts, recv_counts), reps, device)
        rows.append(dict(op=op, case=f"{case} {note}", us=us, bytes=send.numel(), baseline_us=base))

    send_token, send_counts, recv_counts = handle.send_token, handle.send_counts, handle.recv_counts
    row(
        "ep dispatch", lambda: buffer.dispatch(x, topk_idx=idx, topk_weights=weights, **layout),
        [x, idx, weights], send_counts, recv_counts, send_token, "bf16",
    )  # fmt: skip
    row("ep dispatch (cached)", lambda: buffer.dispatch(x, handle=handle), [x], send_counts, recv_counts, send_token,
        "bf16")  # fmt: skip
    row("ep dispatch (cached)", lambda: buffer.dispatch(x_fp8, handle=handle), list(x_fp8), send_counts, recv_counts,
        send_token, "fp8")  # fmt: skip
    row("ep combine", lambda: buffer.combine(recv_x, handle), [recv_x], recv_counts, send_counts, None, "bf16")
    row(
        "ep combine (+weights)", lambda: buffer.combine(recv_x, handle, topk_weights=recv_w), [recv_x, recv_w],
        recv_counts, send_counts, None, "bf16",
    )  # fmt: skip

    # Low latency: fixed exchanges whatever the routing: T + 1 rows to each rank (token index, its expert list, FP8
    # values and scales), T * k rows of bf16 outputs back.
    t = ll_tokens
    ll_x, ll_idx = x[:t], idx[:t]
    (q, _), _, ll_handle, _, _ = buffer.low_latency_dispatch(ll_x, ll_idx, t, EXPERTS)
    fp8_row = 8 + 4 * TOPK + HIDDEN + HIDDEN // 128 * 4
    ll_send = torch.zeros(world * (t + 1), fp8_row, dtype=torch.uint8, device=device)
    us = _time(lambda: buffer.low_latency_dispatch(ll_x, ll_idx, t, EXPERTS), reps, device)
    base = _time(lambda s=ll_send: dist.all_to_all_single(torch.empty_like(s), s), reps, device)
    ll_case = f"R={world} T={t} H={HIDDEN} top-{TOPK}"
    rows.append(dict(op="ep low_latency_dispatch", case=f"{ll_case} fp8", us=us, bytes=ll_send.numel(),
                     baseline_us=base))  # fmt: skip
    y = torch.randn(q.shape, generator=g).to(torch.bfloat16).to(device)
    ll_back = torch.zeros(world * t * TOPK, HIDDEN * 2, dtype=torch.uint8, device=device)
    us = _time(lambda: buffer.low_latency_combine(y, ll_idx, weights[:t], ll_handle), reps, device)
    base = _time(lambda s=ll_back: dist.all_to_all_single(torch.empty_like(s), s), reps, device)
    rows.append(dict(op="ep low_latency_combine", case=f"{ll_case} bf16", us=us, bytes=ll_back.numel(),
                     baseline_us=base))  # fmt: skip
    return rows


def _rank(rank: int, world: int, port: int, device_type: str, tokens: int, ll_tokens: int, reps: int, queue) -> None:
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        if device_type == "cuda":
            torch.cuda.set_device(rank)
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )  # fmt: skip
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        rows = _measure(world, device, tokens, ll_tokens, reps)
        if rank == 0:
            queue.put(("ok", rows))
        dist.destroy_process_group()
    except BaseException as error:  # the parent reports it; the other ranks then time out or fail too
        queue.put(("error", f"rank {rank}: {type(error).__name__}: {error}"))


def _spawn(world: int, device_type: str, tokens: int, ll_tokens: int, reps: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank, args=(r, world, port, device_type, tokens, ll_tokens, reps, queue), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    result = None
    while time.monotonic() < deadline and result is None:
        if not queue.empty():
            result = queue.get()
        elif all(p.exitcode is not None for p in procs):
            result = queue.get() if not queue.empty() else ("error", f"ranks exited {[p.exitcode for p in procs]}")
        else:
            time.sleep(0.05)
    for p in procs:
        p.join(timeout=10)
        if p.exitcode is None:
            p.kill()
            p.join()
    if result is None:
        raise RuntimeError(f"world size {world}: no result within {SPAWN_TIMEOUT_S} s")
    status, payload = result
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def _packing_rows(report: Report, device: torch.device, quick: bool, reps: int | None) -> None:
    """The packing kernels alone (no communication) against the torch index ops they replace, on one device: a
    dispatch's pack (rows by destination into the exchange buffer) and unpack, and a combine's reduction."""
    timer = Timer(device, warmup=2, reps=reps or (5 if quick else 20))
    for tokens in [128] if quick else [128, 4096]:
        _packing_case(report, timer, device, tokens)


def _packing_case(report: Report, timer: Timer, device: torch.device, tokens: int, ranks: int = 8) -> None:
    from dsv3.ops.ep import combine_reduce, copy_rows

    x = torch.randn(tokens, HIDDEN, device=device).to(torch.bfloat16)
    # Each token to about half of the ranks, grouped by destination: the rows a dispatch sends.
    reach = torch.rand(tokens, ranks, device=device) < 0.5
    rows = reach.t().nonzero()[:, 1]
    counts = reach.sum(0).tolist()
    m, width = rows.shape[0], HIDDEN * 2
    buf = torch.empty(m, width, dtype=torch.uint8, device=device)
    case = f"T={tokens} rows={m} H={HIDDEN} bf16"
    report.add(Row(
        "ep pack (copy_rows)", case, device.type, us=timer(lambda: copy_rows(x, buf, src_index=rows)),
        bytes=2 * m * width, baseline="index_select", baseline_us=timer(lambda: x.index_select(0, rows)),
    ))  # fmt: skip
    wide = torch.empty(m, width + 64, dtype=torch.uint8, device=device)  # the payload next to other columns
    out = torch.empty(m, HIDDEN, dtype=torch.bfloat16, device=device)
    report.add(Row(
        "ep unpack (copy_rows)", case, device.type, us=timer(lambda: copy_rows(wide, out, src_offset=64)),
        bytes=2 * m * width, baseline="slice+contiguous",
        baseline_us=timer(lambda: wide[:, 64:].contiguous().view(torch.bfloat16)),
    ))  # fmt: skip

    def torch_combine():
        total = torch.zeros(tokens, HIDDEN, device=device)
        for token, chunk in zip(rows.split(counts), buf.view(torch.bfloat16).split(counts), strict=True):
            total.index_add_(0, token, chunk.float())
        return total

    report.add(Row(
        "ep combine_reduce", case, device.type,
        us=timer(lambda: combine_reduce(buf, torch.bfloat16, HIDDEN, rows, counts, tokens)),
        bytes=m * width + tokens * HIDDEN * 4, flops=m * HIDDEN, baseline="index_add_ per rank",
        baseline_us=timer(torch_combine),
    ))  # fmt: skip


def run(device: torch.device, quick: bool = False, reps: int | None = None) -> Report:
    nccl = device.type == "cuda"
    worlds = [2] if quick else [2, 4]
    if nccl:
        worlds = [w for w in worlds if w <= torch.cuda.device_count()]
    transport = "NCCL" if nccl else "gloo"
    title = f"expert-parallel packing, and dispatch/combine ({transport}) vs all_to_all_single of the same bytes"
    if not worlds:
        title += f" (no distributed rows: NCCL needs 2 GPUs, {torch.cuda.device_count()} visible)"
    report = Report(title)
    _packing_rows(report, device, quick, reps)
    tokens = (64 if quick else 256) if not nccl else (512 if quick else 4096)
    ll_tokens = (16 if quick else 32) if not nccl else 128
    for world in worlds:
        for r in _spawn(world, device.type, tokens, ll_tokens, reps or (5 if quick else 15)):
            report.add(Row(r["op"], r["case"], device.type, us=r["us"], bytes=r["bytes"],
                           baseline="all_to_all_single", baseline_us=r["baseline_us"]))  # fmt: skip
    return report
