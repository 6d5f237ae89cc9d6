"""dsv3: DeepSeek-V3 inference with hand-written CPU and CUDA kernels."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The kernels load on first use, so `import dsv3.reference` (and `import dsv3`) costs nothing and works even where
# the compiled extension is missing.
# name -> (module, attribute of that module; None for the module itself)
_LAZY = {
    "ops": ("dsv3.ops", None),
    "reference": ("dsv3.reference", None),
    "build_info": ("dsv3.info", "build_info"),
    "per_token_group_quant_fp8": ("dsv3.ops", "per_token_group_quant_fp8"),
    "per_block_quant_fp8": ("dsv3.ops", "per_block_quant_fp8"),
    "dequant_fp8_block": ("dsv3.ops", "dequant_fp8_block"),
    "silu_and_mul_quant_fp8": ("dsv3.ops", "silu_and_mul_quant_fp8"),
    "fp8_gemm_nt": ("dsv3.ops", "fp8_gemm_nt"),
    "fp8_linear": ("dsv3.ops", "fp8_linear"),
    "fused_experts": ("dsv3.ops", "fused_experts"),
    "get_mla_metadata": ("dsv3.ops", "get_mla_metadata"),
    "m_grouped_fp8_gemm_nt_contiguous": ("dsv3.ops", "m_grouped_fp8_gemm_nt_contiguous"),
    "m_grouped_fp8_gemm_nt_masked": ("dsv3.ops", "m_grouped_fp8_gemm_nt_masked"),
    "mla_decode_with_kvcache": ("dsv3.ops", "mla_decode_with_kvcache"),
    "append_kv_cache": ("dsv3.ops", "append_kv_cache"),
    "rms_norm": ("dsv3.ops", "rms_norm"),
    "fused_add_rms_norm": ("dsv3.ops", "fused_add_rms_norm"),
    "apply_rope": ("dsv3.ops", "apply_rope"),
    "LLM": ("dsv3.runtime", "LLM"),
    "SamplingParams": ("dsv3.runtime", "SamplingParams"),
    "grouped_topk": ("dsv3.ops", "grouped_topk"),
    "moe_contiguous_layout": ("dsv3.ops", "moe_contiguous_layout"),
    "moe_masked_layout": ("dsv3.ops", "moe_masked_layout"),
    "permute_tokens": ("dsv3.ops", "permute_tokens"),
    "permute_tokens_masked": ("dsv3.ops", "permute_tokens_masked"),
    "unpermute_tokens": ("dsv3.ops", "unpermute_tokens"),
    "unpermute_tokens_masked": ("dsv3.ops", "unpermute_tokens_masked"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dsv3' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # resolved once: later lookups skip this function (ops are called in hot loops)
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
