"""Typed wrappers around dsv3's kernels: validate tensors, allocate outputs, pick the backend from the device.

Each op is also registered as a torch custom op (torch.ops.dsv3.*), so torch.compile and CUDA-graph capture see it.
"""

from dsv3.ops.gemm import fp8_gemm_nt, fp8_linear
from dsv3.ops.quant import dequant_fp8_block, per_block_quant_fp8, per_token_group_quant_fp8

__all__ = [
    "dequant_fp8_block",
    "fp8_gemm_nt",
    "fp8_linear",
    "per_block_quant_fp8",
    "per_token_group_quant_fp8",
]
