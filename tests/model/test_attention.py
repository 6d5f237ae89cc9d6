"""MLA attention's prefill path: which sequences share one kv_b_proj call (its output is what the model tests pin)."""

from __future__ import annotations

from dsv3.model.attention import PROJECTION_ROWS, _projection_groups


def test_prefill_projection_groups_bound_the_rows():
    assert _projection_groups((5, 7, 9)) == [[0, 1, 2]]
    lens = (PROJECTION_ROWS - 10, 10, 1, PROJECTION_ROWS + 5, 3)
    assert _projection_groups(lens) == [[0, 1], [2], [3], [4]]  # a longer sequence goes alone
    assert _projection_groups(()) == []
