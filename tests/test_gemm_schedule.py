"""The CUDA FP8 GEMM's schedule choice (variant and work decomposition), checked without a GPU."""

from __future__ import annotations

import pytest

from dsv3.ops.extension import _C

H200_SMS = 132
# (N, K) of every DeepSeek-V3 FP8 linear layer
DEEPSEEK_V3_SHAPES = [(576, 7168), (1536, 7168), (24576, 1536), (7168, 16384), (7168, 2048), (4096, 7168), (2048, 7168)]


def schedule(m, n, k, sms=H200_SMS):
    return _C.fp8_gemm_schedule(m, n, k, sms)


@pytest.mark.parametrize("m", [1, 16, 64])
def test_decode_sizes_swap_operands(m):
    s = schedule(m, 7168, 2048)
    assert s["variant"] == "swapab128x64"
    assert s["tiles"] == 7168 // 128  # 64 tokens fit one tile column


@pytest.mark.parametrize("m", [65, 128, 4096])
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
    # one wave that already fills >= 90% of the SMs needs no splitting
    assert schedule(512, 4096, 7168)["decomposition"] == "data_parallel"  # 128 tiles on 132 SMs


# What benchmarks/sweep_gemm_schedule.py measured fastest on an H200 (or within 4% of it) for decode batches.
MEASURED_BEST = {
    (576, 7168): ("split_k", 3),
    (1536, 7168): ("split_k", 3),
    (24576, 1536): ("data_parallel", 1),
    (7168, 16384): ("split_k", 2),
    (7168, 2048): ("data_parallel", 1),
    (4096, 7168): ("split_k", 3),
    (2048, 7168): ("split_k", 3),
}


@pytest.mark.parametrize("m", [1, 16, 64, 128])
@pytest.mark.parametrize("n,k", DEEPSEEK_V3_SHAPES)
def test_decode_shapes_get_the_measured_fastest_decomposition(m, n, k):
    s = schedule(m, n, k)
    assert (s["decomposition"], s["splits"]) == MEASURED_BEST[(n, k)]


def test_short_k_is_not_split():
    # 16 K blocks: two 8-block splits lost to one CTA per tile (13 us against 15.5 us at N=7168)
    assert schedule(1, 7168, 2048)["decomposition"] == "data_parallel"
    s = schedule(1, 1024, 256)
    assert s["decomposition"] == "data_parallel" and s["splits"] == 1


def test_splits_never_exceed_the_sms():
    # 100 tiles: a second split per tile would not fit beside the first on 132 SMs
    assert schedule(1, 100 * 128, 16384)["decomposition"] == "data_parallel"
    assert schedule(1, 576, 7168, sms=10)["splits"] == 2  # 5 tiles x 2 splits on 10 SMs


@pytest.mark.parametrize("n,k", DEEPSEEK_V3_SHAPES)
@pytest.mark.parametrize("m", [1, 16, 64, 128, 512, 4096, 16384])
def test_every_deepseek_shape_gets_a_valid_schedule(m, n, k):
    s = schedule(m, n, k)
    assert s["variant"] == ("swapab128x64" if m <= 64 else "tile128x128")
    assert s["tiles"] > 0
    assert s["decomposition"] != "stream_k"
    k_blocks = -(-k // 128)
    if s["decomposition"] == "split_k":
        assert 2 <= s["splits"] <= 3 and s["splits"] * 16 <= k_blocks and s["splits"] * s["tiles"] <= H200_SMS
    else:
        assert s["splits"] == 1


def test_empty_problem():
    assert schedule(0, 7168, 2048)["decomposition"] == "data_parallel"
    assert schedule(0, 7168, 2048)["tiles"] == 0
