"""The benchmark harness shared by every suite.

Timing: on the CPU, warm-up calls then `reps` timed calls, the median wall time. On the GPU, CUDA events around each
call with the L2 cache emptied of the call's operands before it (a read of twice the L2 size), the median. The flush
reads rather than writes: a write would leave the L2 full of dirty lines, and the timed call would then pay for
writing them back to HBM (up to the L2's size of extra traffic, as much as a small GEMM reads). Every row reports time
(us), effective bandwidth (GB/s), throughput (TFLOP/s or GFLOP/s), the share of the H200 peak when on a GPU, and the
ratio to a baseline measured in the same run. On a GPU, `memory_roof_rows` measures what plain copies and reads of
HBM reach on the machine at hand, next to the nominal 4.8 TB/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

# H200 SXM peaks (dense): what the GPU columns are a percentage of.
H200_PEAKS = {"fp8_flops": 1979e12, "bf16_flops": 989e12, "hbm_bytes": 4.8e12}


@dataclass
class Row:
    op: str
    case: str
    device: str
    us: float
    bytes: int = 0
    flops: int = 0
    peak: str = "bf16_flops"  # which compute peak the % column compares with
    baseline: str | None = None
    baseline_us: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / (self.us * 1e-6) / 1e9 if self.us else 0.0

    @property
    def tflop_per_s(self) -> float:
        return self.flops / (self.us * 1e-6) / 1e12 if self.us else 0.0

    @property
    def speedup(self) -> float | None:
        return self.baseline_us / self.us if self.baseline_us and self.us else None

    def percent_of_peak(self) -> tuple[float, float] | None:
        """(% of HBM bandwidth, % of the compute peak) on a GPU; None on the CPU."""
        if self.device == "cpu":
            return None
        return (
            100 * self.bytes / (self.us * 1e-6) / H200_PEAKS["hbm_bytes"],
            100 * self.flops / (self.us * 1e-6) / H200_PEAKS[self.peak],
        )

    def as_dict(self) -> dict:
        record = asdict(self)
        record.update(gb_per_s=self.gb_per_s, tflop_per_s=self.tflop_per_s, speedup=self.speedup)
        peaks = self.percent_of_peak()
        if peaks:
            record.update(percent_hbm=peaks[0], percent_peak=peaks[1])
        return record


class Timer:
    """Median time of a callable on a device, in microseconds; `pair` times an op and its baseline together."""

    def __init__(self, device: torch.device, warmup: int = 3, reps: int = 20):
        self.device, self.warmup, self.reps = device, warmup, reps
        self._flush = None
        if device.type == "cuda":
            l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
            self._flush = torch.zeros(2 * l2_bytes // 4 + 1, dtype=torch.int32, device=device)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return statistics.median(times) * 1e6
        events = []
        for _ in range(self.reps):
            self._flush.sum()  # reads only: the L2 is left holding clean lines of this buffer
            # A ~0.1 ms spin keeps the GPU busy while the host queues the call: the interval between the events is
            # then the device's time for fn, not the Python and launch overhead of issuing it.
            torch.cuda._sleep(200_000)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3

    def pair(self, fn: Callable[[], object], baseline: Callable[[], object]) -> tuple[float, float]:
        """(us of fn, us of baseline). On the CPU their repetitions alternate, so a machine whose speed drifts during
        the measurement (a shared host) slows both alike and their ratio stays meaningful."""
        if self.device.type == "cuda":
            return self(fn), self(baseline)
        for _ in range(self.warmup):
            fn()
            baseline()
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(self.reps):
            for f, samples in ((fn, times[0]), (baseline, times[1])):
                start = time.perf_counter()
                f()
                samples.append(time.perf_counter() - start)
        return statistics.median(times[0]) * 1e6, statistics.median(times[1]) * 1e6


def memory_roof_rows(timer: Timer, device: torch.device, gib: int = 1) -> list[Row]:
    """On a GPU, the HBM bandwidth that torch's own copy and sum kernels reach over `gib` GiB (timed like every op):
    the practical ceiling the %HBM column can be read against. Nothing on the CPU."""
    if device.type != "cuda":
        return []
    n = gib << 30
    source = torch.ones(n, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    words = source.view(torch.int32)
    copy_us = timer(lambda: target.copy_(source))
    sum_us = timer(lambda: words.sum())
    return [
        Row("HBM roof: copy", f"{gib} GiB -> {gib} GiB", device.type, us=copy_us, bytes=2 * n),
        Row("HBM roof: sum (read)", f"{gib} GiB int32", device.type, us=sum_us, bytes=n),
    ]


class Report:
    """Collects rows, prints them as a table, and writes them (with the machine's description) as JSON."""

    def __init__(self, title: str, error: str | None = None):
        self.title = title
        self.error = error  # why the suite stopped, if it did
        self.rows: list[Row] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def table(self) -> str:
        if self.error:
            return f"== {self.title} ==\nFAILED: {self.error}"
        on_gpu = any(r.device != "cpu" for r in self.rows)
        header = f"{'op':<28} {'case':<26} {'us':>10} {'GB/s':>9} {'TFLOP/s' if on_gpu else 'GFLOP/s':>9}"
        header += f" {'%HBM':>6} {'%peak':>6}" if on_gpu else ""
        header += f" {'baseline':>16} {'x base':>7}"
        lines = [f"== {self.title} ==", header]
        for r in self.rows:
            throughput = r.tflop_per_s if on_gpu else r.tflop_per_s * 1e3
            line = f"{r.op:<28} {r.case:<26} {r.us:>10.2f} {r.gb_per_s:>9.1f} {throughput:>9.2f}"
            peaks = r.percent_of_peak()
            if on_gpu:
                line += f" {peaks[0]:>6.1f} {peaks[1]:>6.1f}" if peaks else f" {'-':>6} {'-':>6}"
            speedup = f"{r.speedup:.2f}" if r.speedup else "-"
            line += f" {(r.baseline or '-'):>16} {speedup:>7}"
            lines.append(line)
        return "\n".join(lines)


def write_json(path: str, reports: list[Report]) -> None:
    """One document: the machine, the build, and every report's rows."""
    from dsv3.info import build_info

    document = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "build": build_info(),
        "reports": [{"title": r.title, "error": r.error, "rows": [row.as_dict() for row in r.rows]} for r in reports],
    }
    with open(path, "w") as f:
        json.dump(document, f, indent=1)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return torch.device(name)


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3 bench", description=description)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a few small cases (seconds)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return parser
