"""What the compiled sm_90a code contains: FP8 wgmma and TMA in the GEMM kernels, bf16 wgmma with TMA / bulk copies
in the MLA decode kernels, and no register spills anywhere."""

from __future__ import annotations

import re

import pytest

from dsv3.ops.extension import cuda_compiled
from tests import cuda_binary

pytestmark = [
    pytest.mark.skipif(not cuda_compiled(), reason="built without CUDA kernels"),
    pytest.mark.skipif(cuda_binary.cuobjdump() is None, reason="cuobjdump not found (nvidia-cuda-cuobjdump)"),
]


@pytest.fixture(scope="module")
def sass() -> dict[str, str]:
    try:
        return cuda_binary.sass_by_function()
    except Exception as error:  # nvdisasm missing
        pytest.skip(f"cuobjdump -sass failed: {error}")


def test_fp8_gemm_kernels_use_fp8_wgmma_and_tma(sass):
    # the block-scaled mainloops: four dense variants (128x128, swap-AB 128x64, ping-pong 64x128, 128x128 in 1x2
    # clusters) and the grouped (pointer-array) one
    gemms = {name: code for name, code in sass.items() if "GmmaWarpSpecializedBlockwise" in name}
    assert len(gemms) == 5, f"expected the five FP8 GEMM kernels, found {len(gemms)}"
    assert sum("ArrayTmaGmma" in name for name in gemms) == 1
    # only the clustered variant loads by multicast (its tiles of a reach both CTAs of the cluster in one load)
    assert sum("UTMALDG.3D.MULTICAST" in code for code in gemms.values()) == 1
    for name, code in gemms.items():
        # sm_90a FP8 warpgroup MMA (QGMMA ... E4M3.E4M3 with fp32 accumulators) and bulk tensor (TMA) loads/stores
        assert re.search(r"\b[HQ]GMMA\.64x\d+x32\.F32\.E4M3\.E4M3\b", code), name
        assert "UTMALDG" in code and "UTMASTG" in code, name


def test_overlap_gemm_keeps_one_k_block_of_wgmmas_in_flight_while_promoting(sass):
    # DSV3_FP8_GEMM_KERNEL=overlap / overlap_cluster (variants 4 and 5, dense and grouped): FP8 wgmma 64x128x32 on
    # TMA-loaded tiles, and waits that leave the next K block's group in flight (DEPBAR.LE ... 0x1) wherever the loop
    # promotes a block, 0x0 only for a tile's last block
    kernels = {name: code for name, code in sass.items() if "fp8_gemm_overlap_kernel" in name}
    assert len(kernels) == 4, sorted(kernels)
    for name, code in kernels.items():
        clustered = "ILi2E" in name
        assert set(re.findall(r"\b[HQ]GMMA\.64x(\d+)x32\.F32\.E4M3\.E4M3\b", code)) == {"128"}, name
        assert "UTMALDG.2D" in code and "SYNCS.PHASECHK.TRANS64" in code, name
        waits = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[01])", code)
        assert waits.count("0x1") == 3 and waits.count("0x0") == 2, (name, waits)
        # registers move from the producer warpgroup to the two consumer warpgroups
        assert "USETMAXREG.DEALLOC" in code and "USETMAXREG.TRY_ALLOC" in code, name
        # in clusters, each CTA multicasts its half of the tile of a into both; ring slots are released in the peer by
        # plain remote arrivals (GPU-wide memory fences only in the cluster barriers at the start and the end)
        assert ("UTMALDG.2D.MULTICAST" in code) == clustered, name
        assert code.count("MEMBAR.ALL.GPU") == (2 if clustered else 0), name
    # the consumers' 232 registers come from the producer's: the hand-over balances at 168 a thread (384 threads)
    usage = cuda_binary.resource_usage()
    assert {u["REG"] for name, u in usage.items() if "fp8_gemm_overlap_kernel" in name} == {168}


def test_decode_gemm_streams_tiles_and_scales_and_reduces_splits_through_the_cluster(sass):
    # DSV3_FP8_GEMM_KERNEL=decode (variant 6, dense and masked grouped): m64n64k32 FP8 wgmmas on TMA-loaded tiles,
    # the scales copied by cp.async completing on the same mbarriers, and the K splits' partial sums read from the
    # peers' shared memory (16-byte loads) between two cluster barriers
    kernels = {name: code for name, code in sass.items() if "fp8_gemm_decode_kernel" in name}
    assert len(kernels) == 2, sorted(kernels)
    for name, code in kernels.items():
        assert set(re.findall(r"\b[HQ]GMMA\.64x(\d+)x32\.F32\.E4M3\.E4M3\b", code)) == {"64"}, name
        assert "UTMALDG.2D" in code and "MULTICAST" not in code, name
        assert "LDGSTS" in code and "ARRIVES.LDGSTSBAR.64.ARVCNT" in code, name
        assert code.count("UCGABAR_WAIT") == 2 and "LD.E.128" in code, name
        # launched to overlap the kernel before it, it waits for that kernel (griddepcontrol.wait) before reading
        # anything it may have written
        assert code.count("ACQBULK") == 1, name
    # fp8_linear's quantization lets its GEMM start early (griddepcontrol.launch_dependents)
    quantize = {name: code for name, code in sass.items() if "token_group_quant" in name}
    assert quantize and all("PREEXIT" in code for code in quantize.values()), sorted(quantize)[:3]
    # two CTAs of 288 threads share an SM: at most 113 registers a thread
    usage = cuda_binary.resource_usage()
    assert all(u["REG"] <= 112 for name, u in usage.items() if "fp8_gemm_decode_kernel" in name)


def test_no_kernel_spills_registers():
    usage = cuda_binary.resource_usage()
    assert usage, "no kernels listed"
    spilling = {name: u for name, u in usage.items() if u.get("LOCAL", 0) or u.get("STACK", 0)}
    assert not spilling, f"kernels using local memory (spills or stack): {sorted(spilling)[:3]}"


def test_mla_decode_kernels_use_bf16_wgmma_and_bulk_copies(sass):
    # six instantiations: query tiles of 16, 32 and 64 rows, each for the bf16 and the FP8 cache
    kernels = {name: code for name, code in sass.items() if "mla_decode_kernel" in name}
    assert len(kernels) == 6, f"expected six MLA decode kernels, found {sorted(kernels)}"
    for name, code in kernels.items():
        fp8_cache = "Lb1E" in name
        n = int(re.search(r"mla_decode_kernelILi(\d+)E", name).group(1))
        # bf16 warpgroup MMAs with fp32 accumulators, Q·K (M = 64 tokens) and P·V (M = 64 V columns): up to 32 query
        # rows both products span all N of them (the warpgroups split Q·K by chunks); at 64 Q·K takes 32 per group
        shapes = set(re.findall(r"\bHGMMA\.64x(\d+)x16\.F32\.BF16\b", code))
        assert shapes == ({str(n)} if n <= 32 else {"32", "64"}), (name, shapes)
        # q always arrives by TMA; cache pages by TMA (bf16) or one bulk copy per page (the 656-byte FP8 rows)
        assert "UTMALDG.2D" in code, name
        assert ("UBLKCP" in code) == fp8_cache, name
        assert "SYNCS.PHASECHK.TRANS64" in code, name  # mbarrier waits on the copies' transaction counts
        assert "UBLKPF.L2" in code, name  # pages asked of the L2 ahead of their stage loads


def test_mla_rows_kernel_uses_wide_wgmma_with_p_from_registers(sass):
    # DSV3_MLA_KERNEL=rows: S = Q·Kᵀ as 64x64 tiles, P·V as 64x256 with V read N-major (tnspB), once with P in
    # registers (warpgroup 0) and once from shared memory (warpgroup 1); pages by TMA, prefetched into the L2
    (code,) = [code for name, code in sass.items() if "mla_decode_rows_kernel" in name]
    assert set(re.findall(r"\bHGMMA\.64x(\d+)x16\.F32\.BF16\b", code)) == {"64", "256"}
    assert re.search(r"HGMMA\.64x256x16\.F32\.BF16 R\d+, R\d+, gdesc\[UR\d+\]\.tnspB", code), "P from registers"
    assert re.search(r"HGMMA\.64x256x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspB", code), "P from shared memory"
    assert "UTMALDG.2D" in code and "UBLKPF.L2" in code and "SYNCS.PHASECHK.TRANS64" in code


def test_mla_kernels_keep_everything_in_registers():
    usage = cuda_binary.resource_usage()
    mla = {name: u for name, u in usage.items() if "mla_" in name}
    assert len(mla) >= 10, sorted(mla)  # decode x6 and the rows kernel, combine, schedule, append
    for name, u in mla.items():
        assert u.get("LOCAL", 0) == 0 and u.get("STACK", 0) == 0, (name, u)
