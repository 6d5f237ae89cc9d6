"""The op benchmark suites run on the CPU (quick cases) and report each row against its same-run baseline; the suites
that compare GPU kernels report nothing on the CPU, without failing."""

from __future__ import annotations

import pytest
import torch

from dsv3.bench import SUITES


@pytest.mark.parametrize(
    "suite,ops",
    [
        ("quant", {"per_token_group_quant_fp8", "silu_and_mul_quant_fp8", "per_block_quant_fp8", "dequant_fp8_block"}),
        ("gemm", {"fp8_gemm_nt"}),
        ("mla", {"mla_decode_with_kvcache"}),
        ("moe", {"grouped_topk", "moe_contiguous_layout", "permute_tokens", "permute_tokens+fp8", "unpermute_tokens",
                 "grouped gemm contiguous", "grouped gemm masked", "fused_experts"}),
    ],
)  # fmt: skip
def test_cpu_suite_times_every_op_against_its_baseline(suite, ops) -> None:
    report = SUITES[suite](torch.device("cpu"), True, 1)
    assert report.error is None
    assert {row.op for row in report.rows} == ops
    for row in report.rows:
        assert row.device == "cpu" and row.us > 0 and row.bytes > 0, row
        assert row.baseline and row.baseline_us > 0 and row.speedup > 0, row


@pytest.mark.parametrize("suite", ["gemm_kernels", "mla_rows"])
def test_gpu_kernel_suites_report_nothing_on_the_cpu(suite) -> None:
    report = SUITES[suite](torch.device("cpu"), True, 1)
    assert report.error is None and report.rows == []
