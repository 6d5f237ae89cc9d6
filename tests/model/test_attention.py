"""MLA attention's prefill path: which sequences share one kv_b_proj call and one attention call (their output is what
the model tests pin)."""

from __future__ import annotations

from dsv3.model.attention import PROJECTION_ROWS, _projection_groups


def test_prefill_projection_groups_bound_the_rows():
    assert _projection_groups((5, 7, 9)) == [[0, 1, 2]]
    lens = (PROJECTION_ROWS - 10, 10, 1, PROJECTION_ROWS + 5, 3)
    assert _projection_groups(lens) == [[0, 1], [2], [3], [4]]  # a longer sequence goes alone
    assert _projection_groups(()) == []


def test_prefill_attention_runs_group_consecutive_equal_sequences():
    from dsv3.model.attention import _equal_runs

    query_lens, cached_lens = (4, 4, 4, 2, 4, 4), (4, 4, 9, 2, 4, 4)
    assert _equal_runs([0, 1, 2, 3, 4, 5], query_lens, cached_lens) == [(2, 4, 4), (1, 4, 9), (1, 2, 2), (2, 4, 4)]
    assert _equal_runs([3], query_lens, cached_lens) == [(1, 2, 2)]
    assert _equal_runs([], query_lens, cached_lens) == []
