"""Grouped FP8 GEMMs of MoE layers, with DeepGEMM's m-grouped semantics (contiguous and masked layouts)."""

from __future__ import annotations

import torch

from dsv3.ops.extension import _C, cuda_index, custom_op, num_sms, run_kernel
from dsv3.ops.gemm import BLOCK, FP8Pair, unpack_fp8_pair
from dsv3.ops.tensor_checks import check_aligned, check_positive_int, check_tensor
from dsv3.reference.quant import FP8_DTYPE, ceil_div

CONTIGUOUS, MASKED = 0, 1  # GroupedLayout in csrc/include/dsv3/grouped_gemm_params.h


def _no_output(*args: object) -> None:
    return None


@custom_op("grouped_fp8_gemm", fake=_no_output, mutates_args=("out",))
def _grouped_fp8_gemm(
    layout: int,
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    out: torch.Tensor,
    group_rows: torch.Tensor,
    expected_m: int = 0,
) -> None:
    check_aligned(a=a, sa=sa, b=b, sb=sb, out=out, group_rows=group_rows)
    groups, n, k = b.shape
    m = a.shape[0] if layout == CONTIGUOUS else a.shape[1]
    args = (layout, a.data_ptr(), sa.data_ptr(), b.data_ptr(), sb.data_ptr(), out.data_ptr(), group_rows.data_ptr())
    if a.device.type != "cuda":
        run_kernel("grouped_fp8_gemm", a.device, *args, groups, m, n, k)
        return
    sms = num_sms(cuda_index(a.device))
    workspace = torch.empty(_C.cuda.grouped_fp8_gemm_workspace_bytes(groups, sms), dtype=torch.uint8, device=a.device)
    run_kernel("grouped_fp8_gemm", a.device, *args, groups, m, n, k, expected_m, workspace.data_ptr(), sms)


def _check_weights(qb: torch.Tensor, sb: torch.Tensor, k: int, device: torch.device) -> tuple[int, int]:
    check_tensor(qb, "b", dtypes=(FP8_DTYPE,), ndim=3, device=device)
    groups, n, kb = qb.shape
    if kb != k:
        raise ValueError(f"b: K={kb} does not match a's K={k}")
    check_tensor(
        sb, "b scales", dtypes=(torch.float32,), shape=(groups, ceil_div(n, BLOCK), ceil_div(k, BLOCK)), device=device
    )
    if device.type == "cuda" and (k % 16 or n % 8):
        raise ValueError(f"a/b: on CUDA, K must be a multiple of 16 and N of 8 (TMA row alignment), got K={k}, N={n}")
    return groups, n


def _output(out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.bfloat16, device=device)
    return check_tensor(out, "out", dtypes=(torch.bfloat16,), shape=shape, device=device)


def m_grouped_fp8_gemm_nt_contiguous(
    a: FP8Pair, b: FP8Pair, m_indices: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """out [M_sum, N] bf16: row r = a[r] @ b[m_indices[r]]^T (block-scaled FP8 operands, fp32 accumulation).

    a: (e4m3 [M_sum, K], f32 [M_sum, ceil(K/128)]); b: (e4m3 [G, N, K], f32 [G, ceil(N/128), ceil(K/128)]);
    m_indices: int32 [M_sum], each row's group, -1 for padding rows (their output rows are set to 0).
    On CUDA each group's rows must form one contiguous run (the layout dsv3.ops.moe_contiguous_layout produces); a
    group that does not is skipped and its rows are zeroed. The CPU kernel accepts any order.
    """
    qa, sa = unpack_fp8_pair(a, "a")
    qb, sb = unpack_fp8_pair(b, "b")
    check_tensor(qa, "a", dtypes=(FP8_DTYPE,), ndim=2)
    m, k = qa.shape
    check_tensor(sa, "a scales", dtypes=(torch.float32,), shape=(m, ceil_div(k, BLOCK)), device=qa.device)
    _, n = _check_weights(qb, sb, k, qa.device)
    check_tensor(m_indices, "m_indices", dtypes=(torch.int32,), shape=(m,), device=qa.device)
    out = _output(out, (m, n), qa.device)
    _grouped_fp8_gemm(CONTIGUOUS, qa, sa, qb, sb, out, m_indices)
    return out


def m_grouped_fp8_gemm_nt_masked(
    a: FP8Pair, b: FP8Pair, masked_m: torch.Tensor, expected_m: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """out [G, M_max, N] bf16: out[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g]^T; rows past masked_m[g] are not
    written. masked_m (int32 [G]) is read on the device: no host synchronization, so the call can be graph-captured.

    a: (e4m3 [G, M_max, K], f32 [G, M_max, ceil(K/128)]); b: (e4m3 [G, N, K], f32 [G, ceil(N/128), ceil(K/128)]);
    expected_m: typical masked_m, a scheduling hint that never changes the result.
    """
    qa, sa = unpack_fp8_pair(a, "a")
    qb, sb = unpack_fp8_pair(b, "b")
    check_tensor(qa, "a", dtypes=(FP8_DTYPE,), ndim=3)
    groups, m_max, k = qa.shape
    check_tensor(sa, "a scales", dtypes=(torch.float32,), shape=(groups, m_max, ceil_div(k, BLOCK)), device=qa.device)
    b_groups, n = _check_weights(qb, sb, k, qa.device)
    if b_groups != groups:
        raise ValueError(f"b: {b_groups} groups, but a has {groups}")
    check_tensor(masked_m, "masked_m", dtypes=(torch.int32,), shape=(groups,), device=qa.device)
    check_positive_int(expected_m, "expected_m")
    out = _output(out, (groups, m_max, n), qa.device)
    _grouped_fp8_gemm(MASKED, qa, sa, qb, sb, out, masked_m, expected_m)
    return out
