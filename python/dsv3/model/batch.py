"""Where a forward pass's tokens sit: their sequences, positions and cache slots."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from dsv3.reference.mla import PAGE_SIZE, compute_slot_mapping

# With this many new tokens or fewer in every sequence, attention runs absorbed over the latent cache (FlashMLA-style
# decode, also the MTP verification step); longer chunks (prefill) run unabsorbed, which costs less per token there.
ABSORBED_MAX_QUERY = 2


@dataclass(frozen=True)
class AttentionBatch:
    """A batch of b sequences; sequence i contributes query_lens[i] new tokens, concatenated in sequence order.

    positions: int64 [T], position of each new token in its sequence (the cache holds positions 0 .. p - 1 before it).
    slot_mapping: int64 [T], flat cache row each new token is written to (page * 64 + offset).
    block_table: int32 [b, max_pages], pages of each sequence in position order.
    seq_lens: int32 [b], tokens in the cache per sequence once the new ones are written; cached_lens holds the same
    counts on the host (per-sequence loops read them there rather than synchronizing with the device).
    mla_schedule: the MLA decode kernel's split-KV schedule (metadata, num_splits) for this batch, set by the
    backend's `plan` once per step and shared by every layer; None where the kernel does not run.
    """

    query_lens: tuple[int, ...]
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    cached_lens: tuple[int, ...]
    mla_schedule: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, block_table: torch.Tensor, context_lens: list[int], query_lens: list[int]) -> AttentionBatch:
        """Batch for sequences that already cache context_lens[i] tokens and now add query_lens[i] tokens."""
        if len(context_lens) != len(query_lens) or block_table.shape[0] != len(query_lens):
            raise ValueError(
                f"block_table has {block_table.shape[0]} rows, context_lens {len(context_lens)}, "
                f"query_lens {len(query_lens)}: expected one per sequence"
            )
        if any(n < 1 for n in query_lens):
            raise ValueError(f"query_lens: every sequence needs at least one new token, got {query_lens}")
        device = block_table.device
        # A fixed number of tensor ops whatever the batch size (this runs every step): token t of sequence i sits at
        # context_lens[i] + (t - first token of i).
        lens = torch.tensor(query_lens)
        seq_ids = torch.repeat_interleave(torch.arange(len(query_lens)), lens)
        first_token = lens.cumsum(0) - lens
        positions = torch.arange(int(lens.sum())) + (torch.tensor(context_lens) - first_token)[seq_ids]
        capacity = block_table.shape[1] * PAGE_SIZE
        seq_lens = [c + n for c, n in zip(context_lens, query_lens, strict=True)]
        if max(seq_lens) > capacity:
            raise ValueError(f"a sequence of {max(seq_lens)} tokens does not fit the block table's {capacity} slots")
        positions, seq_ids = positions.to(device), seq_ids.to(device)
        return cls(
            query_lens=tuple(query_lens),
            positions=positions,
            slot_mapping=compute_slot_mapping(block_table, seq_ids, positions),
            block_table=block_table.to(torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            cached_lens=tuple(seq_lens),
        )

    @property
    def absorbed(self) -> bool:
        """True when attention runs absorbed: every sequence adds the same, small number of tokens."""
        return len(set(self.query_lens)) == 1 and self.query_lens[0] <= ABSORBED_MAX_QUERY

    def last_token_rows(self) -> list[int]:
        """Index in the flat token dimension of each sequence's last new token (on the host)."""
        return [end - 1 for end in itertools.accumulate(self.query_lens)]
