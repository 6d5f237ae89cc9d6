"""Helpers shared by the tests and the benchmarks: comparisons, and which kernels a GPU run leaves out."""

from __future__ import annotations

import os

import torch

# CUDA FP8 GEMM variants (codes of dsv3/gemm_schedule.h) by their DSV3_FP8_GEMM_KERNEL names
GEMM_KERNEL_VARIANTS = {"overlap": 4, "overlap_cluster": 5, "decode": 6}


def skipped_kernels() -> frozenset[str]:
    """The kernels named in DSV3_SKIP_KERNELS (separated by spaces or commas): ``overlap``, ``overlap_cluster``,
    ``decode`` (DSV3_FP8_GEMM_KERNEL values) and ``mla_rows`` (DSV3_MLA_KERNEL=rows). scripts/gpu_check.sh names
    there each kernel not yet proven on a GPU whose smoke run (scripts/smoke_untried_kernels.py) failed or hung, so
    the GPU tests, the schedule sweep, the profiles and the benchmarks leave it out instead of waiting on it."""
    return frozenset(os.environ.get("DSV3_SKIP_KERNELS", "").replace(",", " ").split())


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """Normalized disagreement ``1 - 2*sum(x*y) / (sum(x*x) + sum(y*y))`` in float64, over finite positions.

    0 for identical tensors, ~1e-5 for bf16 rounding noise, 1 for uncorrelated data. Two all-zero tensors give 0.
    """
    x, y = x.double(), y.double()
    finite = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[finite], y[finite]
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor") -> None:
    """NaN positions equal, +inf positions equal, -inf positions equal."""
    a, e = actual.double(), expected.double()
    for what, test in (
        ("NaN", torch.isnan),
        ("+inf", lambda t: t == float("inf")),
        ("-inf", lambda t: t == -float("inf")),
    ):
        mismatch = test(a) != test(e)
        if mismatch.any():
            first = tuple(int(i) for i in mismatch.nonzero()[0])
            raise AssertionError(f"{name}: {what} positions differ ({int(mismatch.sum())} places, first at {first})")


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    max_diff: float | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
    name: str = "tensor",
) -> None:
    """Shapes equal, non-finite positions equal, ``|a - e| <= atol + rtol * |e|`` elementwise, calc_diff <= max_diff."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    assert_same_nonfinite(actual, expected, name)
    a, e = actual.double(), expected.double()
    finite = torch.isfinite(a) & torch.isfinite(e)
    error = (a - e).abs()[finite]
    bound = (atol + rtol * e.abs())[finite]
    if (error > bound).any():
        worst = int((error - bound).argmax())
        raise AssertionError(
            f"{name}: {int((error > bound).sum())} of {error.numel()} values beyond atol={atol}, rtol={rtol}; "
            f"worst |diff|={float(error[worst]):.3e} at expected {float(e[finite][worst]):.6g}"
        )
    if max_diff is not None:
        diff = calc_diff(a, e)
        if diff > max_diff:
            raise AssertionError(f"{name}: calc_diff {diff:.3e} > {max_diff:.1e}")


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor") -> None:
    """Same shape, dtype and bytes, except that NaN payloads and signs are not compared (only NaN positions)."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(
            f"{name}: {actual.dtype}{tuple(actual.shape)} != expected {expected.dtype}{tuple(expected.shape)}"
        )
    nan_a, nan_e = torch.isnan(actual.float()), torch.isnan(expected.float())
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(f"{name}: NaN positions differ in {int((nan_a != nan_e).sum())} places")
    if actual.numel() == 0:
        return
    width = actual.element_size()
    bits_a = actual.contiguous().view(torch.uint8).reshape(actual.numel(), width)
    bits_e = expected.contiguous().view(torch.uint8).reshape(expected.numel(), width)
    differ = (bits_a != bits_e).any(dim=1) & ~nan_e.reshape(-1)
    if differ.any():
        first = int(differ.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(differ.sum())} of {actual.numel()} values differ; first at flat index {first}: "
            f"{float(actual.reshape(-1)[first].float())} != {float(expected.reshape(-1)[first].float())}"
        )
