"""MoE routing and token layouts: the specification of the router and permutation kernels.

Routing is DeepSeek-V3's aux-loss-free ("noaux_tc") grouped top-k. Token layouts describe where each (token, k-slot)
pair lands in the input of a grouped GEMM:

* contiguous (prefill): one [M_sum, H] tensor, experts in ascending order, each expert's rows padded up to a multiple of
  ``alignment``; padding rows have ``m_indices == -1`` (see ``gemm.m_grouped_fp8_gemm_nt_contiguous``);
* masked (decode): one [E, max_m, H] tensor, expert e's rows at the front of its slab, ``masked_m[e]`` of them
  (see ``gemm.m_grouped_fp8_gemm_nt_masked``).

In both, an expert's rows are in ascending (token, k) order, and a slot with ``topk_idx == -1`` ("no expert", e.g. an
expert owned by another rank) takes no row. Layouts and permutations are data movement: kernels must match bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ---------------------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------------------


def _descending_order(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dim by descending value; equal values keep ascending index order."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def grouped_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    topk: int,
    num_expert_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 router: sigmoid scores, bias-corrected group-limited top-k selection, unbiased weights.

    router_logits: [T, E], any float dtype (converted to fp32); correction_bias: [E] (converted to fp32).
    E must split into num_expert_group groups of at least 2 consecutive experts; topk <= topk_group * E / groups.

    In fp32:
      score  = sigmoid(logit);  biased = score + bias  (biased scores only select, they never weight)
      group score = sum of the two largest biased scores in the group
      keep the topk_group groups with the highest group score
      pick the topk experts with the highest biased score among the kept groups' experts
      weight = score of the picked expert; if renormalize: weight / (sum of the topk weights, added in slot order);
      then weight * routed_scaling_factor.
    Ties: at every selection step equal values are ranked by ascending index (lower group / expert index wins).
    The renormalization adds no epsilon, like the official inference code: the sum is zero only when every picked
    sigmoid underflows (logits below about -100), which a trained router does not produce. NaN logits give an
    unspecified selection.

    Returns topk_weights f32 [T, topk] and topk_idx int32 [T, topk], experts ordered by descending biased score.
    """
    _check(router_logits.dim() == 2, f"router_logits: expected [T, E], got {tuple(router_logits.shape)}")
    t, e = router_logits.shape
    _check(tuple(correction_bias.shape) == (e,), f"correction_bias: expected [{e}], got {tuple(correction_bias.shape)}")
    _check(num_expert_group > 0 and e % num_expert_group == 0, f"num_expert_group={num_expert_group} must divide E={e}")
    group_size = e // num_expert_group
    _check(group_size >= 2, f"each group needs at least 2 experts, got {group_size}")
    _check(0 < topk_group <= num_expert_group, f"topk_group={topk_group} must lie in [1, {num_expert_group}]")
    _check(0 < topk <= topk_group * group_size, f"topk={topk} must lie in [1, {topk_group * group_size}]")

    scores = torch.sigmoid(router_logits.float())  # [T, E]
    biased = scores + correction_bias.float()  # [T, E]

    per_group = biased.view(t, num_expert_group, group_size)
    top2 = per_group.gather(-1, _descending_order(per_group)[..., :2])  # [T, G, 2]
    group_scores = top2[..., 0] + top2[..., 1]  # [T, G]
    kept_groups = _descending_order(group_scores)[:, :topk_group]  # [T, topk_group]
    group_kept = torch.zeros(t, num_expert_group, dtype=torch.bool, device=scores.device)
    group_kept.scatter_(1, kept_groups, True)
    expert_kept = group_kept.repeat_interleave(group_size, dim=1)  # [T, E]

    # Biased scores are finite, so -inf ranks every expert of a dropped group below every kept expert.
    candidates = biased.masked_fill(~expert_kept, -float("inf"))
    topk_idx = _descending_order(candidates)[:, :topk]  # [T, topk]

    weights = scores.gather(1, topk_idx)
    if renormalize:
        total = weights[:, 0].clone()
        for k in range(1, topk):
            total = total + weights[:, k]
        weights = weights / total[:, None]
    weights = weights * routed_scaling_factor
    return weights, topk_idx.to(torch.int32)


# ---------------------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ContiguousLayout:
    """Where each (token, k-slot) lands in the [M_sum, H] input of a contiguous grouped GEMM.

    m_indices: int32 [M_sum], expert of each row, -1 for a padding row.
    src_token: int64 [M_sum], token copied into each row, -1 for padding.
    src_slot: int64 [M_sum], k-slot of that token, -1 for padding.
    row_of: int64 [T, k], row holding (token, slot), -1 where topk_idx is -1.
    tokens_per_expert: int32 [E], real (unpadded) rows of each expert.
    expert_offsets: int64 [E + 1], expert e owns rows [expert_offsets[e], expert_offsets[e+1]); its real rows come
      first, then padding up to a multiple of the alignment. An expert with no token owns no row. M_sum = offsets[-1].
    """

    m_indices: torch.Tensor
    src_token: torch.Tensor
    src_slot: torch.Tensor
    row_of: torch.Tensor
    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.expert_offsets[-1])


@dataclass
class MaskedLayout:
    """Where each (token, k-slot) lands in the [E, max_m, H] input of a masked grouped GEMM.

    src_token: int64 [E, max_m], token copied into each row, -1 beyond masked_m[e].
    src_slot: int64 [E, max_m], k-slot of that token, -1 beyond masked_m[e].
    masked_m: int32 [E], rows used by each expert (always at the front of its slab).
    row_of: int64 [T, k], flat row ``e * max_m + i`` holding (token, slot), -1 where topk_idx is -1.
    """

    src_token: torch.Tensor
    src_slot: torch.Tensor
    masked_m: torch.Tensor
    row_of: torch.Tensor

    @property
    def max_m(self) -> int:
        return self.src_token.shape[1]


def _check_topk_idx(topk_idx: torch.Tensor, num_experts: int) -> None:
    _check(num_experts > 0, f"num_experts must be positive, got {num_experts}")
    _check(topk_idx.dim() == 2, f"topk_idx: expected [T, k], got {tuple(topk_idx.shape)}")
    _check(
        bool(((topk_idx >= -1) & (topk_idx < num_experts)).all()),
        f"topk_idx: values must lie in [-1, {num_experts}) (-1 = no expert)",
    )


def _pairs_of_expert(topk_idx: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, slot) pairs routed to ``expert``, in ascending (token, slot) order."""
    pairs = (topk_idx == expert).nonzero()  # row-major scan: ascending token, then slot
    return pairs[:, 0], pairs[:, 1]


def moe_contiguous_layout(topk_idx: torch.Tensor, num_experts: int, alignment: int = 128) -> ContiguousLayout:
    """Contiguous grouped-GEMM layout of topk_idx int [T, k] (see ``ContiguousLayout``)."""
    _check_topk_idx(topk_idx, num_experts)
    _check(alignment > 0, f"alignment must be positive, got {alignment}")
    device = topk_idx.device
    counts = torch.bincount(topk_idx[topk_idx >= 0].long(), minlength=num_experts)  # int64 [E]
    padded = (counts + alignment - 1) // alignment * alignment
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    offsets[1:] = padded.cumsum(0)
    m_sum = int(offsets[-1])

    m_indices = torch.full((m_sum,), -1, dtype=torch.int32, device=device)
    src_token = torch.full((m_sum,), -1, dtype=torch.int64, device=device)
    src_slot = torch.full((m_sum,), -1, dtype=torch.int64, device=device)
    row_of = torch.full(topk_idx.shape, -1, dtype=torch.int64, device=device)
    for e in range(num_experts):
        tokens, slots = _pairs_of_expert(topk_idx, e)
        rows = int(offsets[e]) + torch.arange(tokens.numel(), device=device)
        m_indices[rows] = e
        src_token[rows] = tokens
        src_slot[rows] = slots
        row_of[tokens, slots] = rows
    return ContiguousLayout(m_indices, src_token, src_slot, row_of, counts.to(torch.int32), offsets)


def moe_masked_layout(topk_idx: torch.Tensor, num_experts: int, max_m: int) -> MaskedLayout:
    """Masked grouped-GEMM layout of topk_idx int [T, k] (see ``MaskedLayout``).

    Raises ValueError when an expert receives more than max_m rows (nothing is dropped silently).
    """
    _check_topk_idx(topk_idx, num_experts)
    device = topk_idx.device
    src_token = torch.full((num_experts, max_m), -1, dtype=torch.int64, device=device)
    src_slot = torch.full((num_experts, max_m), -1, dtype=torch.int64, device=device)
    masked_m = torch.zeros(num_experts, dtype=torch.int32, device=device)
    row_of = torch.full(topk_idx.shape, -1, dtype=torch.int64, device=device)
    for e in range(num_experts):
        tokens, slots = _pairs_of_expert(topk_idx, e)
        n = tokens.numel()
        _check(n <= max_m, f"expert {e} receives {n} rows, more than max_m={max_m}")
        src_token[e, :n] = tokens
        src_slot[e, :n] = slots
        masked_m[e] = n
        row_of[tokens, slots] = e * max_m + torch.arange(n, device=device)
    return MaskedLayout(src_token, src_slot, masked_m, row_of)


# ---------------------------------------------------------------------------------------------------------------------
# Permutations
# ---------------------------------------------------------------------------------------------------------------------


def _gather_rows(x: torch.Tensor, src_token: torch.Tensor) -> torch.Tensor:
    """[R, H] with row r = x[src_token[r]] (bit copy), or 0 where src_token[r] == -1."""
    out = x.new_zeros(src_token.numel(), x.shape[1])
    valid = src_token >= 0
    out[valid] = x[src_token[valid]]
    return out


def _weighted_sum_rows(y: torch.Tensor, row_of: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """[T, H]: Σ_k weight[t, k] * y[row_of[t, k]] in fp32 from +0, slots added in order k = 0, 1, ..., skipping -1."""
    _check(
        topk_weights.shape == row_of.shape,
        f"topk_weights: expected {tuple(row_of.shape)}, got {tuple(topk_weights.shape)}",
    )
    t, k = row_of.shape
    acc = torch.zeros(t, y.shape[1], dtype=torch.float32, device=y.device)
    for slot in range(k):
        rows = row_of[:, slot]
        valid = rows >= 0
        term = topk_weights[valid, slot].float()[:, None] * y[rows[valid]].float()
        acc[valid] = acc[valid] + term
    return acc.to(y.dtype)


def permute_tokens(x: torch.Tensor, layout: ContiguousLayout) -> torch.Tensor:
    """x [T, H] -> [M_sum, H]: row r is a bit copy of x[src_token[r]]; padding rows are 0."""
    _check(x.dim() == 2, f"x: expected [T, H], got {tuple(x.shape)}")
    _check(x.shape[0] == layout.row_of.shape[0], f"x: {x.shape[0]} tokens, layout has {layout.row_of.shape[0]}")
    return _gather_rows(x, layout.src_token)


def unpermute_tokens(y: torch.Tensor, layout: ContiguousLayout, topk_weights: torch.Tensor) -> torch.Tensor:
    """y [M_sum, H] -> [T, H] in y's dtype: out[t] = Σ_k topk_weights[t, k] * y[row_of[t, k]].

    Computed in fp32: the sum starts at +0 and adds the fp32-rounded products in slot order k = 0, 1, ...; the result is
    rounded once to y's dtype (so a lone -0.0 comes back as +0.0).
    Slots with topk_idx == -1 contribute nothing (their weight is never read); a token with no slot gives 0.
    """
    _check(y.dim() == 2 and y.shape[0] == layout.num_rows, f"y: expected [{layout.num_rows}, H], got {tuple(y.shape)}")
    return _weighted_sum_rows(y, layout.row_of, topk_weights)


def permute_tokens_masked(x: torch.Tensor, layout: MaskedLayout) -> torch.Tensor:
    """x [T, H] -> [E, max_m, H]: row (e, i) is a bit copy of x[src_token[e, i]]; rows >= masked_m[e] are 0."""
    _check(x.dim() == 2, f"x: expected [T, H], got {tuple(x.shape)}")
    _check(x.shape[0] == layout.row_of.shape[0], f"x: {x.shape[0]} tokens, layout has {layout.row_of.shape[0]}")
    experts, max_m = layout.src_token.shape
    return _gather_rows(x, layout.src_token.reshape(-1)).view(experts, max_m, x.shape[1])


def unpermute_tokens_masked(y: torch.Tensor, layout: MaskedLayout, topk_weights: torch.Tensor) -> torch.Tensor:
    """y [E, max_m, H] -> [T, H], the weighted sum of ``unpermute_tokens`` over the masked layout's rows."""
    experts, max_m = layout.src_token.shape
    _check(
        y.dim() == 3 and tuple(y.shape[:2]) == (experts, max_m),
        f"y: expected [{experts}, {max_m}, H], got {tuple(y.shape)}",
    )
    return _weighted_sum_rows(y.reshape(experts * max_m, y.shape[2]), layout.row_of, topk_weights)
