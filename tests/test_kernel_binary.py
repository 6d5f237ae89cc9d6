"""What the compiled sm_90a code contains: FP8 wgmma and TMA in the GEMM kernels, and no register spills anywhere."""

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
    # the block-scaled mainloops: two dense variants (128x128, swap-AB 128x64) and the grouped (pointer-array) one
    gemms = {name: code for name, code in sass.items() if "GmmaWarpSpecializedBlockwise" in name}
    assert len(gemms) == 3, f"expected the three FP8 GEMM kernels, found {len(gemms)}"
    assert sum("ArrayTmaGmma" in name for name in gemms) == 1
    for name, code in gemms.items():
        # sm_90a FP8 warpgroup MMA (QGMMA ... E4M3.E4M3 with fp32 accumulators) and bulk tensor (TMA) loads/stores
        assert re.search(r"\b[HQ]GMMA\.64x\d+x32\.F32\.E4M3\.E4M3\b", code), name
        assert "UTMALDG" in code and "UTMASTG" in code, name


def test_no_kernel_spills_registers():
    usage = cuda_binary.resource_usage()
    assert usage, "no kernels listed"
    spilling = {name: u for name, u in usage.items() if u.get("LOCAL", 0) or u.get("STACK", 0)}
    assert not spilling, f"kernels using local memory (spills or stack): {sorted(spilling)[:3]}"
