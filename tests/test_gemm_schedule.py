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


def test_few_tiles_split_k_when_it_fills_the_gpu():
    # 2048 weight rows = 16 tiles; 132 / 16 = 8 splits of 56 / 8 = 7 K blocks fill 128 of 132 SMs
    s = schedule(16, 2048, 7168)
    assert s == {"variant": "swapab128x64", "decomposition": "split_k", "splits": 8, "tiles": 16}
    assert s["splits"] * s["tiles"] * 10 >= H200_SMS * 9


def test_few_tiles_uneven_split_uses_stream_k():
    s = schedule(1, 7168, 2048)  # 56 tiles: 2 splits would fill 112 of 132 SMs
    assert s["decomposition"] == "stream_k" and s["splits"] == 1


def test_short_k_is_not_split():
    # 2 K blocks cannot be split into >= 4-block pieces, and are too short to stream
    s = schedule(1, 1024, 256)
    assert s["decomposition"] == "data_parallel" and s["splits"] == 1


@pytest.mark.parametrize("n,k", DEEPSEEK_V3_SHAPES)
@pytest.mark.parametrize("m", [1, 16, 64, 128, 512, 4096, 16384])
def test_every_deepseek_shape_gets_a_valid_schedule(m, n, k):
    s = schedule(m, n, k)
    assert s["variant"] == ("swapab128x64" if m <= 64 else "tile128x128")
    assert s["tiles"] > 0
    k_blocks = -(-k // 128)
    if s["decomposition"] == "split_k":
        assert s["splits"] >= 2 and s["splits"] * 4 <= k_blocks and s["splits"] * s["tiles"] <= H200_SMS
    else:
        assert s["splits"] == 1


def test_empty_problem():
    assert schedule(0, 7168, 2048)["decomposition"] == "data_parallel"
    assert schedule(0, 7168, 2048)["tiles"] == 0
