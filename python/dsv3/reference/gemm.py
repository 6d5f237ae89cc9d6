"""FP8 GEMMs with block scales: the specification of the dense and grouped (MoE) kernels.

Every GEMM here computes ``dequant(a) @ dequant(b).T`` in fp32 and rounds once to ``out_dtype``:

* ``a`` is an activation: e4m3 [M, K] with fp32 scales [M, ceil(K/128)], one scale per row and per 128 consecutive
  channels (the last channel group may be partial when K is not a multiple of 128);
* ``b`` is a weight: e4m3 [N, K] with fp32 scales [ceil(N/128), ceil(K/128)], one per 128x128 tile (edge tiles partial).

Kernels accumulate in a different order (and DeepGEMM promotes partial sums per 128-wide K slice), so they are
compared with a tolerance, not bitwise. The grouped variants are, by definition, the dense GEMM applied per group.
"""

from __future__ import annotations

import torch

from dsv3.reference.quant import FP8_DTYPE, ceil_div, expand_block_scales

GROUP = 128

FP8Tensor = tuple[torch.Tensor, torch.Tensor]  # (e4m3 values, fp32 scales)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_fp8_pair(pair: FP8Tensor, name: str) -> None:
    _check(isinstance(pair, (tuple, list)) and len(pair) == 2, f"{name}: expected a (values, scales) pair")
    q, s = pair
    _check(q.dtype == FP8_DTYPE, f"{name}: values must be {FP8_DTYPE}, got {q.dtype}")
    _check(s.dtype == torch.float32, f"{name}: scales must be torch.float32, got {s.dtype}")


def dequant_activation(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``q [..., K] * scale [..., ceil(K/128)]``, a scale per 128 channels (the last group may be partial)."""
    k = q.shape[-1]
    return q.float() * scale.repeat_interleave(GROUP, dim=-1)[..., :k]


def dequant_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``q [N, K] * scale [ceil(N/128), ceil(K/128)]`` expanded over 128x128 tiles."""
    n, k = q.shape
    return q.float() * expand_block_scales(scale, n, k, GROUP)


def fp8_gemm_nt(a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``out [M, N] = (a * sa) @ (b * sb).T`` in fp32, rounded once to ``out_dtype``.

    a: (e4m3 [M, K], f32 [M, ceil(K/128)]) — per-token, per-128-channel scales.
    b: (e4m3 [N, K], f32 [ceil(N/128), ceil(K/128)]) — 128x128 block scales.
    Returns out_dtype [M, N]. M, N and K may be any positive size (M may be 0).
    """
    _check_fp8_pair(a, "a")
    _check_fp8_pair(b, "b")
    qa, sa = a
    qb, sb = b
    _check(qa.dim() == 2 and qb.dim() == 2, f"a and b values must be 2-D, got {tuple(qa.shape)} and {tuple(qb.shape)}")
    m, k = qa.shape
    n, kb = qb.shape
    _check(kb == k, f"b: K={kb} does not match a's K={k}")
    _check(
        tuple(sa.shape) == (m, ceil_div(k, GROUP)),
        f"a scales: expected {(m, ceil_div(k, GROUP))}, got {tuple(sa.shape)}",
    )
    expected_sb = (ceil_div(n, GROUP), ceil_div(k, GROUP))
    _check(tuple(sb.shape) == expected_sb, f"b scales: expected {expected_sb}, got {tuple(sb.shape)}")
    out = dequant_activation(qa, sa) @ dequant_weight(qb, sb).T
    return out.to(out_dtype)


def m_grouped_fp8_gemm_nt_contiguous(
    a: FP8Tensor, b: FP8Tensor, m_indices: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Grouped GEMM over rows that are concatenated in one tensor (MoE prefill layout).

    a: (e4m3 [M_sum, K], f32 [M_sum, ceil(K/128)]).
    b: (e4m3 [G, N, K], f32 [G, ceil(N/128), ceil(K/128)]) — one block-scaled weight per group.
    m_indices: int32 [M_sum], the group of each row, or -1 for a padding row. Rows need not be sorted.
    Returns out_dtype [M_sum, N]: row r is ``fp8_gemm_nt(a[r], b[m_indices[r]])``, padding rows are 0.
    """
    _check_fp8_pair(a, "a")
    _check_fp8_pair(b, "b")
    qa, sa = a
    qb, sb = b
    _check(qa.dim() == 2, f"a: values must be [M_sum, K], got {tuple(qa.shape)}")
    _check(qb.dim() == 3, f"b: values must be [G, N, K], got {tuple(qb.shape)}")
    groups, n, _ = qb.shape
    _check(
        m_indices.dtype == torch.int32 and tuple(m_indices.shape) == (qa.shape[0],),
        f"m_indices: expected int32 [{qa.shape[0]}], got {m_indices.dtype}{tuple(m_indices.shape)}",
    )
    _check(
        bool(((m_indices >= -1) & (m_indices < groups)).all()),
        f"m_indices: values must lie in [-1, {groups}) (-1 marks padding)",
    )
    out = torch.zeros(qa.shape[0], n, dtype=out_dtype, device=qa.device)
    for g in range(groups):
        rows = (m_indices == g).nonzero().squeeze(1)
        if rows.numel() > 0:
            out[rows] = fp8_gemm_nt((qa[rows], sa[rows]), (qb[g], sb[g]), out_dtype)
    return out


def m_grouped_fp8_gemm_nt_masked(
    a: FP8Tensor,
    b: FP8Tensor,
    masked_m: torch.Tensor,
    expected_m: int | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Grouped GEMM over a fixed-capacity buffer per group (MoE decode layout).

    a: (e4m3 [G, M_max, K], f32 [G, M_max, ceil(K/128)]).
    b: (e4m3 [G, N, K], f32 [G, ceil(N/128), ceil(K/128)]).
    masked_m: int32 [G], valid rows per group, each in [0, M_max].
    expected_m: a scheduling hint for kernels (typical masked_m); it never changes the result.
    Returns out_dtype [G, M_max, N]: ``out[g, :masked_m[g]] = fp8_gemm_nt(a[g, :masked_m[g]], b[g])``; the rows at and
    beyond masked_m[g] are 0 in this specification (kernels may leave them unwritten; compare only valid rows).
    """
    del expected_m
    _check_fp8_pair(a, "a")
    _check_fp8_pair(b, "b")
    qa, sa = a
    qb, sb = b
    _check(qa.dim() == 3, f"a: values must be [G, M_max, K], got {tuple(qa.shape)}")
    _check(qb.dim() == 3, f"b: values must be [G, N, K], got {tuple(qb.shape)}")
    groups, m_max, _ = qa.shape
    _check(qb.shape[0] == groups, f"b: {qb.shape[0]} groups, but a has {groups}")
    _check(
        masked_m.dtype == torch.int32 and tuple(masked_m.shape) == (groups,),
        f"masked_m: expected int32 [{groups}], got {masked_m.dtype}{tuple(masked_m.shape)}",
    )
    _check(bool(((masked_m >= 0) & (masked_m <= m_max)).all()), f"masked_m: values must lie in [0, {m_max}]")
    out = torch.zeros(groups, m_max, qb.shape[1], dtype=out_dtype, device=qa.device)
    for g in range(groups):
        m = int(masked_m[g])
        if m > 0:
            out[g, :m] = fp8_gemm_nt((qa[g, :m], sa[g, :m]), (qb[g], sb[g]), out_dtype)
    return out
