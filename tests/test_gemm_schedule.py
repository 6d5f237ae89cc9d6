"""The CUDA FP8 GEMM's schedule choice (variant and work decomposition), checked without a GPU against what
benchmarks/sweep_gemm_schedule.py measured on an H200 (the newest benchmarks/results/*-gemm-schedules.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv3.ops.extension import _C, cuda_compiled

H200_SMS = 132
# (N, K) of every DeepSeek-V3 FP8 linear layer
DEEPSEEK_V3_SHAPES = [(576, 7168), (1536, 7168), (24576, 1536), (7168, 16384), (7168, 2048), (4096, 7168), (2048, 7168)]
SWEEP = sorted((Path(__file__).parents[1] / "benchmarks" / "results").glob("*H200*-gemm-schedules.json"))[-1]
SWEEP_CASES = json.loads(SWEEP.read_text())["cases"]


def schedule(m, n, k, sms=H200_SMS):
    return _C.fp8_gemm_schedule(m, n, k, sms)


def label(s) -> str:
    """The sweep's name for a schedule."""
    splits = f"x{s['splits']}" if s["decomposition"] == "split_k" else ""
    return f"{s['variant']}/{s['decomposition']}{splits}"


@pytest.mark.parametrize("case", SWEEP_CASES, ids=lambda c: f"M={c['m']} N={c['n']} K={c['k']}")
def test_each_measured_shape_gets_a_schedule_near_the_fastest(case):
    # within 10%: the spread between repeated runs of one schedule at ~20 us was up to 5%
    times = case["us"]
    mine = times[label(schedule(case["m"], case["n"], case["k"]))]
    assert mine <= 1.10 * min(times.values()), f"{label(schedule(case['m'], case['n'], case['k']))}: {mine:.1f} us"


def test_the_sweep_as_a_whole_is_within_two_percent_of_the_fastest_schedules():
    chosen = sum(c["us"][label(schedule(c["m"], c["n"], c["k"]))] for c in SWEEP_CASES)
    fastest = sum(min(c["us"].values()) for c in SWEEP_CASES)
    assert chosen <= 1.02 * fastest, f"{chosen:.0f} us against {fastest:.0f} us"


@pytest.mark.parametrize("m", [1, 16, 64])
def test_decode_sizes_with_few_weight_tiles_swap_operands(m):
    s = schedule(m, 2048, 7168)
    assert s["variant"] == "swapab128x64"
    assert s["tiles"] == 2048 // 128  # 64 tokens fit one tile column


@pytest.mark.parametrize("m", [1, 64, 128])
def test_many_weight_tiles_at_decode_sizes_take_the_pingpong_kernel(m):
    s = schedule(m, 7168, 2048)
    assert (s["variant"], s["decomposition"], s["splits"]) == ("pingpong64x128", "data_parallel", 1)
    assert s["tiles"] == -(-m // 64) * 56


def test_pingpong_at_more_tokens_only_within_one_wave():
    assert schedule(512, 2048, 7168)["variant"] == "pingpong64x128"  # 8 x 16 = 128 tiles on 132 SMs
    assert schedule(512, 4096, 7168)["variant"] == "tile128x128"  # 256 ping-pong tiles
    assert schedule(129, 7168, 2048)["variant"] == "tile128x128"  # 3 x 56 = 168 ping-pong tiles


@pytest.mark.parametrize("m", [129, 4096])
def test_prefill_sizes_use_square_tiles(m):
    s = schedule(m, 7168, 2048)
    assert s["variant"] == "tile128x128"
    assert s["tiles"] == -(-m // 128) * 56


def test_many_tiles_run_data_parallel():
    assert schedule(4096, 7168, 16384) == {
        "variant": "tile128x128",
        "decomposition": "data_parallel",
        "splits": 1,
        "tiles": 32 * 56,
    }
    assert schedule(512, 4096, 7168)["decomposition"] == "data_parallel"  # 128 tiles on 132 SMs: one wave


def test_stream_k_between_one_and_two_waves_of_long_k():
    assert schedule(4096, 576, 7168)["decomposition"] == "stream_k"  # 160 tiles, 56 K blocks
    assert schedule(512, 7168, 16384)["decomposition"] == "stream_k"  # 224 tiles
    assert schedule(512, 7168, 2048)["decomposition"] == "data_parallel"  # 224 tiles, but 16 K blocks
    assert schedule(4096, 1536, 7168)["decomposition"] == "data_parallel"  # 384 tiles: almost three waves


def test_short_k_is_not_split():
    # 16 K blocks: two 8-block splits lost to one CTA per tile (13 us against 15.5 us at N=7168)
    assert schedule(1, 2048, 2048)["decomposition"] == "data_parallel"
    s = schedule(1, 1024, 256)
    assert s["decomposition"] == "data_parallel" and s["splits"] == 1


def test_splits_never_exceed_the_sms():
    assert schedule(1, 576, 7168)["splits"] == 3  # 5 tiles x 3 splits
    assert schedule(1, 576, 7168, sms=10)["splits"] == 2  # 5 tiles x 2 splits on 10 SMs
    assert schedule(1, 40 * 128, 16384)["splits"] == 3  # 40 tiles (under the ping-pong threshold) x 3 = 120
    assert schedule(1, 40 * 128, 16384, sms=100)["splits"] == 2


@pytest.mark.parametrize("n,k", DEEPSEEK_V3_SHAPES)
@pytest.mark.parametrize("m", [1, 16, 64, 128, 512, 4096, 16384])
def test_every_deepseek_shape_gets_a_valid_schedule(m, n, k):
    s = schedule(m, n, k)
    assert s["tiles"] > 0
    assert s["variant"] != "swapab128x64" or m <= 64
    assert s["variant"] != "pingpong64x128" or s["decomposition"] == "data_parallel"
    k_blocks = -(-k // 128)
    if s["decomposition"] == "split_k":
        assert 2 <= s["splits"] <= 3 and s["splits"] * 16 <= k_blocks and s["splits"] * s["tiles"] <= H200_SMS
    else:
        assert s["splits"] == 1
    if s["decomposition"] == "stream_k":
        assert H200_SMS < s["tiles"] < 2 * H200_SMS


def test_empty_problem():
    assert schedule(0, 7168, 2048)["decomposition"] == "data_parallel"
    assert schedule(0, 7168, 2048)["tiles"] == 0


@pytest.mark.skipif(not cuda_compiled(), reason="built without CUDA kernels")
def test_an_unknown_kernel_request_is_an_error_naming_the_variable(monkeypatch):
    # the CUDA GEMM's schedule is resolved (and this checked) before any device work, so no GPU is needed
    monkeypatch.setenv("DSV3_FP8_GEMM_KERNEL", "overlapp")
    with pytest.raises(ValueError, match="DSV3_FP8_GEMM_KERNEL: expected overlap, overlap_cluster or decode"):
        _C.cuda.fp8_gemm_workspace_bytes(4096, 7168, 16384, 132, None)
    monkeypatch.setenv("DSV3_FP8_GEMM_KERNEL", "overlap_cluster")
    assert _C.cuda.fp8_gemm_workspace_bytes(64, 576, 7168, 132, None) == 0  # the heuristic would split K here
    monkeypatch.setenv("DSV3_FP8_GEMM_KERNEL", "decode")
    assert _C.cuda.fp8_gemm_workspace_bytes(64, 576, 7168, 132, None) == 0  # split K, but through shared memory


@pytest.mark.parametrize(
    "m,n,k,splits",
    [
        (64, 7168, 16384, 4),  # 56 tiles: 224 CTAs on 264 slots (two per SM)
        (1, 576, 7168, 8),  # 5 tiles: a full cluster of 8
        (16, 4096, 7168, 8),  # 32 tiles x 8 = 256 CTAs; 7 K blocks a split
        (64, 7168, 2048, 4),  # 16 K blocks: 4 a split at 4 splits
        (1, 24576, 1536, 1),  # 192 tiles fill the SMs alone
        (128, 7168, 16384, 2),  # 2 tiles of tokens x 56
        (1, 576, 512, 1),  # 4 K blocks: no split
    ],
)
def test_decode_kernel_splits_k_to_fill_two_ctas_per_sm(m, n, k, splits):
    tiles = -(-m // 64) * -(-n // 128)
    assert _C.fp8_gemm_decode_splits(tiles, k, H200_SMS) == splits


@pytest.mark.parametrize("n,k", DEEPSEEK_V3_SHAPES)
@pytest.mark.parametrize("m", [0, 1, 16, 64, 128, 512])
def test_decode_kernel_splits_stay_within_a_cluster_the_slots_and_k(m, n, k):
    tiles = -(-m // 64) * -(-n // 128)
    splits = _C.fp8_gemm_decode_splits(tiles, k, H200_SMS)
    assert 1 <= splits <= 8
    assert splits == 1 or (splits * tiles <= 2 * H200_SMS and 4 * splits <= -(-k // 128))
