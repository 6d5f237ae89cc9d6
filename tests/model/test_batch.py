"""AttentionBatch: where each new token of a batch goes, on the device and (for per-sequence loops) on the host."""

from __future__ import annotations

import pytest
import torch

from dsv3.model.batch import AttentionBatch


def test_build_places_every_new_token():
    table = torch.tensor([[3, 7], [5, 0]], dtype=torch.int32)  # sequence 0 crosses from page 3 into page 7
    batch = AttentionBatch.build(table, [62, 0], [3, 2])
    assert batch.positions.tolist() == [62, 63, 64, 0, 1]
    assert batch.slot_mapping.tolist() == [3 * 64 + 62, 3 * 64 + 63, 7 * 64, 5 * 64, 5 * 64 + 1]
    assert batch.seq_lens.tolist() == [65, 2] and batch.seq_lens.dtype == torch.int32
    assert batch.cached_lens == (65, 2)  # the same counts, readable without a device synchronization
    assert batch.last_token_rows() == [2, 4]
    assert not batch.absorbed and AttentionBatch.build(table, [65, 2], [1, 1]).absorbed


def test_build_rejects_sequences_past_the_block_table():
    table = torch.tensor([[3, 7]], dtype=torch.int32)
    with pytest.raises(ValueError, match="does not fit the block table's 128 slots"):
        AttentionBatch.build(table, [120], [9])
    with pytest.raises(ValueError, match="query_lens: every sequence needs at least one new token"):
        AttentionBatch.build(table, [0], [0])
