"""A quick end-to-end check of the installed kernels against dsv3.reference, for `dsv3 demo` and `dsv3 check`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import dsv3.ops as ops
from dsv3.reference import quant as ref
from dsv3.testing import assert_bitwise_equal


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

    return [
        ("per_token_group_quant_fp8", token_quant),
        ("per_block_quant_fp8", block_quant),
        ("dequant_fp8_block", dequant),
    ]


def run_self_check(device: torch.device) -> list[CheckResult]:
    """Run every op on `device` and compare with the reference bit for bit; failures are reported, not raised."""
    torch.manual_seed(0)
    results = []
    for name, check in _checks():
        try:
            check(device)
            results.append(CheckResult(name, device.type, True))
        except AssertionError as error:
            results.append(CheckResult(name, device.type, False, str(error)))
    return results
