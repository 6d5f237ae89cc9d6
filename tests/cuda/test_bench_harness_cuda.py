"""The benchmark harness on a GPU: its memory roof is physically plausible, so the timer measures device time."""

from __future__ import annotations

import torch

from dsv3.bench.harness import H200_PEAKS, Timer, memory_roof_rows


def test_memory_roof_is_below_the_nominal_bandwidth_and_not_far_from_it():
    device = torch.device("cuda")
    rows = memory_roof_rows(Timer(device, warmup=1, reps=5), device)
    assert [r.op for r in rows] == ["HBM roof: copy", "HBM roof: sum (read)"]
    for row in rows:
        # above the nominal peak would mean the timer misses device time (or the L2 served the data); far below it,
        # that it counts host time or a flush
        assert 0.3 * H200_PEAKS["hbm_bytes"] < row.gb_per_s * 1e9 <= H200_PEAKS["hbm_bytes"], (row.op, row.gb_per_s)
