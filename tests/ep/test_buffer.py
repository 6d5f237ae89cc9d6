"""dsv3.ep.Buffer on 2 and 4 gloo ranks: layouts, dispatch, combine, cached and FP8 dispatch, bad input, failures."""

from __future__ import annotations

import time

import pytest

from tests.ep import workers
from tests.ep.launcher import RanksFailed, run_ranks


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_combine(world: int) -> None:
    run_ranks(world, workers.dispatch_combine)


def test_bad_input_raises_on_every_rank() -> None:
    run_ranks(2, workers.bad_input)


def test_dead_rank_fails_fast() -> None:
    start = time.monotonic()
    with pytest.raises(RanksFailed, match=r"exit codes \[.*, 3\]"):
        run_ranks(2, workers.rank1_dies, timeout=20)
    assert time.monotonic() - start < 25


def test_stuck_rank_fails_within_the_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(RanksFailed, match="killed"):
        run_ranks(2, workers.rank1_hangs, timeout=6)
    assert time.monotonic() - start < 12


@pytest.mark.parametrize("world", [2, 4])
def test_low_latency_agrees_with_the_normal_path(world: int) -> None:
    run_ranks(world, workers.low_latency)


def test_asynchronous_calls_overlap_and_match_the_synchronous_ones() -> None:
    run_ranks(2, workers.asynchronous, timeout=40)
