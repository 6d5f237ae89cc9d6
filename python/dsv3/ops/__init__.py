"""Typed wrappers around dsv3's kernels: validate tensors, allocate outputs, pick the backend from the device.

Each op is also registered as a torch custom op (torch.ops.dsv3.*), so torch.compile and CUDA-graph capture see it.
"""

from dsv3.ops.fused_moe import fused_experts
from dsv3.ops.gemm import fp8_gemm_nt, fp8_linear
from dsv3.ops.grouped_gemm import m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked
from dsv3.ops.layers import apply_rope, fused_add_rms_norm, rms_norm
from dsv3.ops.mla import append_kv_cache, get_mla_metadata, mla_decode_with_kvcache
from dsv3.ops.moe import (
    grouped_topk,
    moe_contiguous_layout,
    moe_masked_layout,
    permute_tokens,
    permute_tokens_masked,
    unpermute_tokens,
    unpermute_tokens_masked,
)
from dsv3.ops.quant import (
    dequant_fp8_block,
    per_block_quant_fp8,
    per_token_group_quant_fp8,
    silu_and_mul_quant_fp8,
)

__all__ = [
    "append_kv_cache",
    "apply_rope",
    "dequant_fp8_block",
    "fp8_gemm_nt",
    "fp8_linear",
    "fused_add_rms_norm",
    "fused_experts",
    "get_mla_metadata",
    "grouped_topk",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "mla_decode_with_kvcache",
    "moe_contiguous_layout",
    "moe_masked_layout",
    "per_block_quant_fp8",
    "per_token_group_quant_fp8",
    "permute_tokens",
    "permute_tokens_masked",
    "rms_norm",
    "silu_and_mul_quant_fp8",
    "unpermute_tokens",
    "unpermute_tokens_masked",
]
