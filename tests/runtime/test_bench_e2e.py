"""The end-to-end benchmark suite: prefill and decode rows for every batch against transformers, and none of
transformers' loading chatter in its output."""

from __future__ import annotations

import torch

from dsv3.bench import SUITES
from dsv3.bench.e2e import BATCHES


def test_e2e_suite_reports_both_phases_per_batch_quietly(capfd) -> None:
    report = SUITES["e2e"](torch.device("cpu"), True, 1)
    assert report.error is None
    assert [(row.op, row.case) for row in report.rows] == [
        (f"generate {phase}", f"batch={batch}") for batch in BATCHES for phase in ("prefill", "decode")
    ]
    for row in report.rows:
        assert row.us > 0 and row.baseline == "transformers" and row.baseline_us > 0, row
        assert row.extra["tokens_per_s"] > 0 and row.extra["baseline_tokens_per_s"] > 0, row
    output = capfd.readouterr()
    assert "LOAD REPORT" not in output.out + output.err
    assert "Loading weights" not in output.out + output.err
