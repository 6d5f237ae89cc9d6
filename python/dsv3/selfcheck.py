"""A quick end-to-end check of the installed kernels against dsv3.reference, for `dsv3 demo` and `dsv3 check`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import dsv3.ops as ops
from dsv3.reference import gemm as ref_gemm
from dsv3.reference import quant as ref
from dsv3.testing import assert_bitwise_equal, assert_same_nonfinite, calc_diff


@dataclass
class CheckResult:
    name: str
    device: str
    passed: bool
    detail: str = ""


def _adversarial(rows: int, cols: int) -> torch.Tensor:
    x = torch.randn(rows, cols) * torch.logspace(-4, 4, cols)
    x[0, :] = 0.0
    x[-1, 1] = 1e6
    x[-1, 2] = 1e-40
    return x


def _checks() -> list[tuple[str, Callable[[torch.device], None]]]:
    def token_quant(device: torch.device) -> None:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for ue8m0 in (False, True):
                x = _adversarial(33, 1024).to(dtype)
                q, s = ops.per_token_group_quant_fp8(x.to(device), ue8m0=ue8m0)
                rq, rs = ref.per_token_group_quant_fp8(x, ue8m0=ue8m0)
                assert_bitwise_equal(s.cpu(), rs, f"scales ({dtype}, ue8m0={ue8m0})")
                assert_bitwise_equal(q.cpu(), rq, f"q ({dtype}, ue8m0={ue8m0})")

    def block_quant(device: torch.device) -> None:
        w = _adversarial(576, 300).to(torch.bfloat16)
        q, s = ops.per_block_quant_fp8(w.to(device))
        rq, rs = ref.per_block_quant_fp8(w)
        assert_bitwise_equal(s.cpu(), rs, "scale_inv")
        assert_bitwise_equal(q.cpu(), rq, "q")

    def dequant(device: torch.device) -> None:
        rq, rs = ref.per_block_quant_fp8(_adversarial(300, 576))
        out = ops.dequant_fp8_block(rq.to(device), rs.to(device))
        assert_bitwise_equal(out.cpu(), ref.dequant_fp8_block(rq, rs), "out")

    def gemm(device: torch.device) -> None:
        # 576 rows: a partial weight tile; NaN codes in one row of a and one row of b spread over a row and a column.
        a = ref.per_token_group_quant_fp8(_adversarial(33, 640))
        b = ref.per_block_quant_fp8(_adversarial(576, 640))
        a[0].view(torch.uint8)[5, 17] = 0x7F
        b[0].view(torch.uint8)[300, 600] = 0xFF
        out = ops.fp8_gemm_nt((a[0].to(device), a[1].to(device)), (b[0].to(device), b[1].to(device))).cpu()
        expected = ref_gemm.fp8_gemm_nt(a, b)
        assert_same_nonfinite(out, expected, "out")
        diff = calc_diff(out, expected)
        assert diff <= 1e-5, f"out: calc_diff {diff:.3e} > 1e-5"

    return [
        ("per_token_group_quant_fp8", token_quant),
        ("per_block_quant_fp8", block_quant),
        ("dequant_fp8_block", dequant),
        ("fp8_gemm_nt", gemm),
    ]


def run_self_check(device: torch.device) -> list[CheckResult]:
    """Run every op on `device` and compare with the reference (bit for bit, or within calc_diff 1e-5 for the GEMM);
    failures are reported, not raised."""
    torch.manual_seed(0)
    results = []
    for name, check in _checks():
        try:
            check(device)
            results.append(CheckResult(name, device.type, True))
        except AssertionError as error:
            results.append(CheckResult(name, device.type, False, str(error)))
    return results
