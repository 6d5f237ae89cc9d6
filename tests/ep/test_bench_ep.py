"""The ep benchmark suite runs its ranks and reports every op with its all_to_all_single baseline."""

from __future__ import annotations

import torch

from dsv3.bench import SUITES


def test_ep_suite_reports_each_op_against_the_raw_exchange() -> None:
    report = SUITES["ep"](torch.device("cpu"), True, 1)
    assert report.error is None
    ops = [row.op for row in report.rows]
    assert ops == [
        "ep pack (copy_rows)", "ep unpack (copy_rows)", "ep combine_reduce",
        "ep dispatch", "ep dispatch (cached)", "ep dispatch (cached)", "ep combine", "ep combine (+weights)",
        "ep low_latency_dispatch", "ep low_latency_combine",
    ]  # fmt: skip
    for row in report.rows:
        assert row.us > 0 and row.baseline_us > 0 and row.bytes > 0, row
        assert (row.baseline == "all_to_all_single") == ("R=2" in row.case), row
