"""Run a function on R gloo (or NCCL) ranks in spawned processes, with a deadline: a rank that fails, dies or hangs
fails the caller within the deadline instead of hanging the test session."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback

import torch.multiprocessing as mp


class RanksFailed(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, backend: str, fn, args: tuple, errors) -> None:
    import faulthandler

    import torch
    import torch.distributed as dist

    faulthandler.enable()  # a crash in native code prints the Python stack of the rank
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU a rank
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )  # fmt: skip
        fn(rank, world, *args)
        dist.destroy_process_group()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        os._exit(1)
    # Leave without interpreter teardown: gloo objects still referenced from caught exceptions' frames would be
    # destroyed there in an arbitrary order, which can abort the process after it has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(world: int, fn, *args, timeout: float = 30.0, backend: str = "gloo") -> None:
    """fn(rank, world, *args) on `world` ranks (with backend "nccl", rank r on GPU r); raises RanksFailed naming the
    ranks that failed or outlived timeout."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, backend, fn, args, errors), daemon=True) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.exitcode is None for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            break  # one rank failed: the others may be blocked in a collective with it
        time.sleep(0.05)
    for p in procs:
        if p.exitcode is None:
            p.kill()
        p.join()
    reports = []
    while not errors.empty():
        rank, text = errors.get()
        reports.append(f"rank {rank}:\n{text}")
    codes = [p.exitcode for p in procs]
    if any(codes):
        hung = [r for r, c in enumerate(codes) if c == -9]
        raise RanksFailed(f"exit codes {codes} (killed, still running: {hung})\n" + "\n".join(reports))
