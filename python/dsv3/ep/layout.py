"""Which tokens go to which rank: the local half of expert-parallel dispatch (no communication).

Experts are split evenly and in order: with R ranks and E experts, rank r owns experts [r*E/R, (r+1)*E/R).
"""

from __future__ import annotations

import torch

INDEX_DTYPES = (torch.int32, torch.int64)


def check_num_experts(num_experts: object, world_size: int) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by the world size {world_size}")
    return num_experts


def check_topk_idx(topk_idx: object, num_experts: int) -> torch.Tensor:
    """topk_idx must be int32/int64 [N, k] with values in [-1, num_experts) (-1 = no expert)."""
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype not in INDEX_DTYPES or topk_idx.dim() != 2:
        got = f"{topk_idx.dtype} {list(topk_idx.shape)}" if isinstance(topk_idx, torch.Tensor) else type(topk_idx)
        raise ValueError(f"topk_idx: expected an int32/int64 tensor [num_tokens, k], got {got}")
    if topk_idx.numel():
        low, high = int(topk_idx.min()), int(topk_idx.max())
        if low < -1 or high >= num_experts:
            raise ValueError(f"topk_idx: values must lie in [-1, {num_experts}) (-1 = no expert), got [{low}, {high}]")
    return topk_idx


def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_idx [N, k] -> (num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E],
    is_token_in_rank bool [N, R]).

    A token counts once for a rank however many of its experts that rank owns; a -1 slot counts nowhere.
    Inputs must already be checked (check_num_experts, check_topk_idx).
    """
    n = topk_idx.shape[0]
    experts_per_rank = num_experts // world_size
    valid = topk_idx >= 0
    # Slots without an expert point at an extra column R that is dropped afterwards.
    rank_of_slot = torch.where(valid, topk_idx.div(experts_per_rank, rounding_mode="floor"), world_size).long()
    in_rank = torch.zeros(n, world_size + 1, dtype=torch.bool, device=topk_idx.device)
    in_rank.scatter_(1, rank_of_slot, True)
    is_token_in_rank = in_rank[:, :world_size].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    num_tokens_per_expert = torch.bincount(topk_idx[valid].long(), minlength=num_experts).to(torch.int32)
    return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank
