"""MoE routing (DeepSeek-V3's noaux_tc grouped top-k), token layouts for the grouped GEMMs, and token (un)permutation.

Semantics are those of dsv3.reference.moe, reproduced bit for bit by the CPU and CUDA kernels (routing: the same
experts, and the same weights wherever torch's own sigmoid takes its vectorized path; see csrc/include/dsv3/
moe_routing.h). Two differences come from running without host synchronization on the GPU:

* ``moe_contiguous_layout`` on a GPU cannot know M_sum before its kernels have run, so it allocates the upper bound
  ``T*k + min(E, T*k) * (alignment - 1)`` rows; the rows past ``expert_offsets[-1]`` (= ``num_rows``) are padding,
  with ``m_indices == -1`` (the grouped GEMM skips them) and zero rows after ``permute_tokens``. On the CPU the
  layout has exactly M_sum rows.
* Bad ``topk_idx`` values and masked-layout overflow raise ValueError on the CPU. On a GPU the kernels skip the
  offending slots (they take no row, so nothing is read or written out of bounds) and count them in
  ``layout.errors``; ``layout.check()`` synchronizes and raises the same ValueError. Masked layouts also report
  ``tokens_per_expert`` (rows each expert asked for, before capping at max_m), so a caller can size max_m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.ops.extension import _C, DTYPE_CODES, FLOAT_DTYPES, custom_op, run_kernel
from dsv3.ops.tensor_checks import check_aligned, check_positive_int, check_tensor
from dsv3.reference import moe as ref
from dsv3.reference.quant import FP8_DTYPE

QUANT_GROUP = 128  # channels per scale of the fused permute-and-quantize
MAX_EXPERTS = 1024  # kMoeMaxExperts of csrc/include/dsv3/moe_params.h
INDEX_DTYPES = (torch.int32, torch.int64)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------------------


def _topk_shapes(logits, bias, topk, num_expert_group, topk_group, routed_scaling_factor, renormalize):
    t = logits.shape[0]
    return logits.new_empty(t, topk, dtype=torch.float32), logits.new_empty(t, topk, dtype=torch.int32)


@custom_op("grouped_topk", fake=_topk_shapes)
def _grouped_topk(
    logits: torch.Tensor,
    bias: torch.Tensor,
    topk: int,
    num_expert_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    t, e = logits.shape
    weights = torch.empty(t, topk, dtype=torch.float32, device=logits.device)
    indices = torch.empty(t, topk, dtype=torch.int32, device=logits.device)
    run_kernel(
        "grouped_topk", logits.device, logits.data_ptr(), DTYPE_CODES[logits.dtype], bias.data_ptr(),
        weights.data_ptr(), indices.data_ptr(), t, e, num_expert_group, topk_group, topk, routed_scaling_factor,
        renormalize,
    )  # fmt: skip
    return weights, indices


def grouped_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    topk: int,
    num_expert_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 router (noaux_tc): sigmoid scores, bias-corrected group-limited top-k, unbiased weights.

    router_logits: fp32/bf16/fp16 [T, E] (E <= 1024); correction_bias: fp32 [E], finite.
    E splits into num_expert_group (<= 32) groups of at least 2 experts; the topk_group groups with the largest sum
    of their two best biased scores are kept; topk (<= 32) experts are picked among them by biased score (ties: lower
    index). Returns topk_weights f32 [T, topk] (sigmoid scores, renormalized to sum 1 when `renormalize`, times
    routed_scaling_factor) and topk_idx int32 [T, topk], ordered by descending biased score.
    """
    check_tensor(router_logits, "router_logits", dtypes=FLOAT_DTYPES, ndim=2)
    e = router_logits.shape[1]
    check_tensor(correction_bias, "correction_bias", dtypes=(torch.float32,), shape=(e,), device=router_logits.device)
    check_positive_int(num_expert_group, "num_expert_group")
    if e % num_expert_group or e // num_expert_group < 2:
        raise ValueError(f"num_expert_group={num_expert_group} must divide E={e} into groups of at least 2 experts")
    check_positive_int(topk_group, "topk_group")
    if topk_group > num_expert_group:
        raise ValueError(f"topk_group={topk_group} must lie in [1, {num_expert_group}]")
    check_positive_int(topk, "topk")
    if topk > topk_group * (e // num_expert_group):
        raise ValueError(f"topk={topk} must lie in [1, {topk_group * (e // num_expert_group)}]")
    return _grouped_topk(
        router_logits, correction_bias, topk, num_expert_group, topk_group, float(routed_scaling_factor),
        bool(renormalize),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------------------


def _raise_layout_errors(errors: torch.Tensor, num_experts: int, max_m: int | None) -> None:
    bad_index, dropped = (int(v) for v in errors.tolist())
    if bad_index:
        raise ValueError(f"topk_idx: {bad_index} values outside [-1, {num_experts}) (-1 = no expert)")
    if dropped:
        raise ValueError(f"max_m={max_m}: {dropped} slots routed to experts already holding max_m rows")


@dataclass
class ContiguousLayout(ref.ContiguousLayout):
    """dsv3.reference.moe.ContiguousLayout plus errors: int32 [2], the slots skipped on a GPU for an expert outside
    [-1, E) (errors[1] is always 0). On a GPU the row tensors may extend past num_rows (see the module docstring)."""

    errors: torch.Tensor

    def check(self) -> None:
        """Raise ValueError if the GPU kernels skipped slots (synchronizes with the device)."""
        _raise_layout_errors(self.errors, self.tokens_per_expert.numel(), None)


@dataclass
class MaskedLayout(ref.MaskedLayout):
    """dsv3.reference.moe.MaskedLayout plus tokens_per_expert: int32 [E], the slots routed to each expert (beyond
    max_m on a GPU when it overflowed), and errors: int32 [2], the slots a GPU skipped for an expert outside [-1, E)
    and for arriving when their expert already held max_m rows."""

    tokens_per_expert: torch.Tensor
    errors: torch.Tensor

    def check(self) -> None:
        """Raise ValueError if the GPU kernels skipped slots (synchronizes with the device)."""
        _raise_layout_errors(self.errors, self.masked_m.numel(), self.max_m)


def contiguous_rows_bound(tokens: int, topk: int, num_experts: int, alignment: int) -> int:
    """Rows a GPU allocates for a contiguous layout: every slot, plus alignment - 1 padding rows per expert that can
    hold one (at most min(E, T*k) experts are non-empty)."""
    entries = tokens * topk
    return entries + min(num_experts, entries) * (alignment - 1)


def _layout_workspace(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor | None:
    """GPU only: per-chunk expert counts, [ceil(T*k / chunk), E] int32, written by counting and read by placing."""
    if topk_idx.device.type != "cuda":
        return None
    chunks = -(-topk_idx.numel() // _C.moe_layout_chunk)
    return torch.empty(chunks, num_experts, dtype=torch.int32, device=topk_idx.device)


def _run_layout(
    kernel: str,
    topk_idx: torch.Tensor,
    num_experts: int,
    *,
    counts: torch.Tensor,
    errors: torch.Tensor,
    alignment: int = 0,
    max_m: int = -1,
    rows: int = 0,
    offsets: torch.Tensor | None = None,
    masked_m: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    outputs: tuple[torch.Tensor | None, ...] = (None, None, None, None),
) -> None:
    """moe_layout_count or moe_layout_scatter (masked when max_m >= 0); placing writes into
    outputs = (m_indices, src_token, src_slot, row_of)."""

    def address(tensor: torch.Tensor | None) -> int:
        return 0 if tensor is None else tensor.data_ptr()

    t, k = topk_idx.shape
    run_kernel(
        kernel, topk_idx.device, topk_idx.data_ptr(), topk_idx.dtype == torch.int64, t, k, num_experts, max_m >= 0,
        alignment, max(max_m, 0), rows, counts.data_ptr(), address(offsets), address(masked_m), address(workspace),
        errors.data_ptr(), *(address(o) for o in outputs),
    )  # fmt: skip


def _contiguous_layout_shapes(topk_idx: torch.Tensor, num_experts: int, alignment: int):
    t, k = topk_idx.shape
    if topk_idx.device.type == "cpu":
        rows = torch.library.get_ctx().new_dynamic_size()
    else:
        rows = contiguous_rows_bound(t, k, num_experts, alignment)
    new = topk_idx.new_empty
    return (
        new(rows, dtype=torch.int32), new(rows, dtype=torch.int64), new(rows, dtype=torch.int64),
        new(t, k, dtype=torch.int64), new(num_experts, dtype=torch.int32), new(num_experts + 1, dtype=torch.int64),
        new(2, dtype=torch.int32),
    )  # fmt: skip


@custom_op("moe_contiguous_layout", fake=_contiguous_layout_shapes)
def _contiguous_layout(
    topk_idx: torch.Tensor, num_experts: int, alignment: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    device = topk_idx.device
    t, k = topk_idx.shape
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=device)
    errors = torch.zeros(2, dtype=torch.int32, device=device)
    workspace = _layout_workspace(topk_idx, num_experts)
    common = dict(alignment=alignment, counts=counts, offsets=offsets, workspace=workspace, errors=errors)
    _run_layout("moe_layout_count", topk_idx, num_experts, **common)
    # The CPU knows M_sum once counting is done; a GPU would have to synchronize, so it allocates the bound instead.
    rows = int(offsets[-1]) if device.type == "cpu" else contiguous_rows_bound(t, k, num_experts, alignment)
    outputs = (
        torch.empty(rows, dtype=torch.int32, device=device),  # m_indices
        torch.empty(rows, dtype=torch.int64, device=device),  # src_token
        torch.empty(rows, dtype=torch.int64, device=device),  # src_slot
        torch.empty(t, k, dtype=torch.int64, device=device),  # row_of
    )
    _run_layout("moe_layout_scatter", topk_idx, num_experts, rows=rows, outputs=outputs, **common)
    return (*outputs, counts, offsets, errors)


def _check_topk_idx(topk_idx: torch.Tensor, num_experts: int) -> None:
    check_tensor(topk_idx, "topk_idx", dtypes=INDEX_DTYPES, ndim=2)
    check_positive_int(num_experts, "num_experts")
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"num_experts: expected at most {MAX_EXPERTS}, got {num_experts}")


def moe_contiguous_layout(topk_idx: torch.Tensor, num_experts: int, alignment: int = 128) -> ContiguousLayout:
    """Contiguous grouped-GEMM layout of topk_idx int32/int64 [T, k] (see dsv3.reference.moe.ContiguousLayout):
    experts in ascending order, each expert's rows in (token, slot) order and padded to a multiple of alignment.

    On the CPU a value outside [-1, num_experts) raises ValueError; on a GPU see the module docstring.
    """
    _check_topk_idx(topk_idx, num_experts)
    check_positive_int(alignment, "alignment")
    m_indices, src_token, src_slot, row_of, counts, offsets, errors = _contiguous_layout(
        topk_idx, num_experts, alignment
    )
    return ContiguousLayout(m_indices, src_token, src_slot, row_of, counts, offsets, errors)


def _masked_layout_shapes(topk_idx: torch.Tensor, num_experts: int, max_m: int):
    new = topk_idx.new_empty
    return (
        new(num_experts, max_m, dtype=torch.int64), new(num_experts, max_m, dtype=torch.int64),
        new(num_experts, dtype=torch.int32), new(topk_idx.shape, dtype=torch.int64),
        new(num_experts, dtype=torch.int32), new(2, dtype=torch.int32),
    )  # fmt: skip


@custom_op("moe_masked_layout", fake=_masked_layout_shapes)
def _masked_layout(
    topk_idx: torch.Tensor, num_experts: int, max_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    device = topk_idx.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    masked_m = torch.empty(num_experts, dtype=torch.int32, device=device)
    errors = torch.zeros(2, dtype=torch.int32, device=device)
    workspace = _layout_workspace(topk_idx, num_experts)
    rows = num_experts * max_m
    common = dict(max_m=max_m, rows=rows, counts=counts, masked_m=masked_m, workspace=workspace, errors=errors)
    _run_layout("moe_layout_count", topk_idx, num_experts, **common)
    src_token = torch.empty(num_experts, max_m, dtype=torch.int64, device=device)
    src_slot = torch.empty(num_experts, max_m, dtype=torch.int64, device=device)
    row_of = torch.empty(topk_idx.shape, dtype=torch.int64, device=device)
    outputs = (None, src_token, src_slot, row_of)
    _run_layout("moe_layout_scatter", topk_idx, num_experts, outputs=outputs, **common)
    return src_token, src_slot, masked_m, row_of, counts, errors


def moe_masked_layout(topk_idx: torch.Tensor, num_experts: int, max_m: int) -> MaskedLayout:
    """Masked grouped-GEMM layout of topk_idx int32/int64 [T, k] (see dsv3.reference.moe.MaskedLayout): expert e's
    rows at the front of slab e of [E, max_m], in (token, slot) order. No host synchronization on a GPU.

    On the CPU a value outside [-1, num_experts) or an expert with more than max_m rows raises ValueError; on a GPU
    see the module docstring.
    """
    _check_topk_idx(topk_idx, num_experts)
    _check_int(max_m, "max_m", 0)
    return MaskedLayout(*_masked_layout(topk_idx, num_experts, max_m))


# ---------------------------------------------------------------------------------------------------------------------
# Permutations
# ---------------------------------------------------------------------------------------------------------------------


def _permute_shapes(x: torch.Tensor, src_token: torch.Tensor, quantize: bool, ue8m0: bool):
    rows, hidden = src_token.numel(), x.shape[1]
    if quantize:
        return x.new_empty(rows, hidden, dtype=FP8_DTYPE), x.new_empty(rows, hidden // QUANT_GROUP, dtype=torch.float32)
    return x.new_empty(rows, hidden), x.new_empty(0, dtype=torch.float32)


@custom_op("moe_permute", fake=_permute_shapes)
def _permute(
    x: torch.Tensor, src_token: torch.Tensor, quantize: bool, ue8m0: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    check_aligned(x=x)  # 16-byte row copies and loads; indices and weights are read one by one
    rows, hidden = src_token.numel(), x.shape[1]
    if quantize:
        out = None
        q = torch.empty(rows, hidden, dtype=FP8_DTYPE, device=x.device)
        scales = torch.empty(rows, hidden // QUANT_GROUP, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
        q, scales = None, torch.empty(0, dtype=torch.float32, device=x.device)
    run_kernel(
        "moe_permute", x.device, x.data_ptr(), DTYPE_CODES[x.dtype], src_token.data_ptr(),
        0 if out is None else out.data_ptr(), 0 if q is None else q.data_ptr(), scales.data_ptr() if quantize else 0,
        x.shape[0], hidden, rows, quantize, ue8m0,
    )  # fmt: skip
    return (q, scales) if quantize else (out, scales)


def _check_x(x: torch.Tensor, row_of: torch.Tensor, quantize: bool) -> None:
    check_tensor(x, "x", dtypes=FLOAT_DTYPES, ndim=2)
    if x.shape[0] != row_of.shape[0]:
        raise ValueError(f"x: {x.shape[0]} tokens, the layout has {row_of.shape[0]}")
    if quantize and x.shape[1] % QUANT_GROUP:
        raise ValueError(f"x: hidden size {x.shape[1]} is not a multiple of {QUANT_GROUP} (quantize=True)")


def _layout_tensor(layout: object, field: str, dtypes: tuple, device: torch.device, ndim: int) -> torch.Tensor:
    return check_tensor(getattr(layout, field, None), f"layout.{field}", dtypes=dtypes, ndim=ndim, device=device)


def permute_tokens(
    x: torch.Tensor, layout: ref.ContiguousLayout, quantize: bool = False, ue8m0: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x fp32/bf16/fp16 [T, H] -> [rows, H]: row r is a bit copy of x[layout.src_token[r]], padding rows are 0.

    rows = layout.src_token.numel() (M_sum, or the GPU's bound). With quantize=True the rows are quantized on the
    way, fused: returns (q e4m3 [rows, H], scales f32 [rows, H / 128]), exactly per_token_group_quant_fp8 of the
    permuted rows (power-of-two scales with ue8m0); H must then be a multiple of 128.
    """
    src_token = _layout_tensor(layout, "src_token", (torch.int64,), x.device, 1)
    _check_x(x, _layout_tensor(layout, "row_of", (torch.int64,), x.device, 2), quantize)
    out, scales = _permute(x, src_token, bool(quantize), bool(ue8m0))
    return (out, scales) if quantize else out


def permute_tokens_masked(
    x: torch.Tensor, layout: ref.MaskedLayout, quantize: bool = False, ue8m0: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> [E, max_m, H]: row (e, i) is a bit copy of x[layout.src_token[e, i]], rows past masked_m[e] are 0;
    with quantize=True, (q e4m3 [E, max_m, H], scales f32 [E, max_m, H / 128]) as in permute_tokens."""
    src_token = _layout_tensor(layout, "src_token", (torch.int64,), x.device, 2)
    _check_x(x, _layout_tensor(layout, "row_of", (torch.int64,), x.device, 2), quantize)
    experts, max_m = src_token.shape
    out, scales = _permute(x, src_token.reshape(-1), bool(quantize), bool(ue8m0))
    out = out.view(experts, max_m, x.shape[1])
    return (out, scales.view(experts, max_m, -1)) if quantize else out


def _unpermute_shapes(y: torch.Tensor, row_of: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    return y.new_empty(row_of.shape[0], y.shape[1])


@custom_op("moe_unpermute", fake=_unpermute_shapes)
def _unpermute(y: torch.Tensor, row_of: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    check_aligned(y=y)
    t, k = row_of.shape
    out = torch.empty(t, y.shape[1], dtype=y.dtype, device=y.device)
    run_kernel(
        "moe_unpermute", y.device, y.data_ptr(), DTYPE_CODES[y.dtype], row_of.data_ptr(), topk_weights.data_ptr(),
        out.data_ptr(), t, k, y.shape[0], y.shape[1],
    )  # fmt: skip
    return out


def _check_weights(topk_weights: torch.Tensor, row_of: torch.Tensor, device: torch.device) -> None:
    check_tensor(topk_weights, "topk_weights", dtypes=(torch.float32,), shape=tuple(row_of.shape), device=device)


def unpermute_tokens(y: torch.Tensor, layout: ref.ContiguousLayout, topk_weights: torch.Tensor) -> torch.Tensor:
    """y fp32/bf16/fp16 [rows, H] -> [T, H] in y's dtype: out[t] = Σ_k topk_weights[t, k] * y[layout.row_of[t, k]],
    in fp32 from +0 in slot order, rounded once; slots without a row add nothing. topk_weights: f32 [T, k]."""
    check_tensor(y, "y", dtypes=FLOAT_DTYPES, ndim=2)
    m_indices = _layout_tensor(layout, "m_indices", (torch.int32,), y.device, 1)
    if y.shape[0] != m_indices.shape[0]:
        raise ValueError(f"y: expected [{m_indices.shape[0]}, H] (the layout's rows), got {list(y.shape)}")
    row_of = _layout_tensor(layout, "row_of", (torch.int64,), y.device, 2)
    _check_weights(topk_weights, row_of, y.device)
    return _unpermute(y, row_of, topk_weights)


def unpermute_tokens_masked(y: torch.Tensor, layout: ref.MaskedLayout, topk_weights: torch.Tensor) -> torch.Tensor:
    """y [E, max_m, H] -> [T, H]: the weighted sum of unpermute_tokens over the masked layout's rows."""
    src_token = _layout_tensor(layout, "src_token", (torch.int64,), y.device, 2)
    check_tensor(y, "y", dtypes=FLOAT_DTYPES, ndim=3)
    if tuple(y.shape[:2]) != tuple(src_token.shape):
        raise ValueError(f"y: expected [{src_token.shape[0]}, {src_token.shape[1]}, H], got {list(y.shape)}")
    row_of = _layout_tensor(layout, "row_of", (torch.int64,), y.device, 2)
    _check_weights(topk_weights, row_of, y.device)
    return _unpermute(y.view(-1, y.shape[2]), row_of, topk_weights)
