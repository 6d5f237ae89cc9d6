"""The ops the model calls, chosen once: "reference" (dsv3.reference, fp32 PyTorch) or "kernels" (dsv3.ops).

With "kernels", each op comes from dsv3.ops when its compiled kernel exists for the model's device and the kernel
accepts the model's dtype (the table KERNEL_SUPPORT states both); otherwise the reference op is used, so the model
always runs and `kernel_ops` says which ops are compiled. Both backends share one signature per op:

  fp8_linear(x bf16 [..., K], (e4m3 [N, K], f32 [ceil(N/128), ceil(K/128)])) -> bf16 [..., N]
  swiglu_fp8(x bf16 [T, H], w13 FP8 [2I, H] (gate; up), w2 FP8 [H, I]) -> bf16 [T, H] = down(silu(gate x) * up x)
  append_kv_cache(kv_cache, slot_mapping, latent, rope)                       (dsv3.reference.mla)
  mla_decode_with_kvcache(q, kv_cache, batch, head_dim_v, softmax_scale, causal) -> (out, lse)
  grouped_topk(router_logits, correction_bias, topk, num_expert_group, topk_group, routed_scaling_factor, renormalize)
  rms_norm(x, weight, eps) / fused_add_rms_norm(x, residual, weight, eps) / apply_rope(x, positions, cos_sin)

MLA decode runs once per layer over the same batch, so its split-KV schedule (FlashMLA's get_mla_metadata) is computed
once per forward step by `plan` and carried on the AttentionBatch to every layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsv3 import reference
from dsv3.model.batch import AttentionBatch

BACKENDS = ("reference", "kernels")


@dataclass(frozen=True)
class KernelSupport:
    """Where dsv3.ops runs an op: the device types it has a kernel for, the compiled kernel that needs (absent from
    a build without CUDA), and the model dtypes the kernel accepts."""

    devices: tuple[str, ...]
    kernel: str  # name in dsv3._C.cpu / dsv3._C.cuda
    dtypes: tuple[torch.dtype, ...]


# The MLA kernels take bf16 queries and bf16/FP8 caches, so a float32 model (fp32 cache) uses the reference ops;
# the FP8 GEMMs only run in a bfloat16 model (a float32 model dequantizes its weights). The layer kernels take
# either dtype.
KERNEL_SUPPORT = {
    "fp8_linear": KernelSupport(("cpu", "cuda"), "fp8_gemm_nt", (torch.bfloat16,)),
    "swiglu_fp8": KernelSupport(("cpu", "cuda"), "silu_and_mul_quant_fp8", (torch.bfloat16,)),
    "fused_experts": KernelSupport(("cpu", "cuda"), "grouped_fp8_gemm", (torch.bfloat16,)),
    "grouped_topk": KernelSupport(("cpu", "cuda"), "grouped_topk", (torch.bfloat16, torch.float32)),
    "append_kv_cache": KernelSupport(("cpu", "cuda"), "mla_append_kv", (torch.bfloat16,)),
    "mla_decode_with_kvcache": KernelSupport(("cpu", "cuda"), "mla_decode", (torch.bfloat16,)),
    "rms_norm": KernelSupport(("cpu", "cuda"), "rms_norm", (torch.bfloat16, torch.float32)),
    "fused_add_rms_norm": KernelSupport(("cpu", "cuda"), "rms_norm", (torch.bfloat16, torch.float32)),
    "apply_rope": KernelSupport(("cpu", "cuda"), "apply_rope", (torch.bfloat16, torch.float32)),
}


def reference_fp8_linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x quantized per token and 128 channels, times the block-scaled weight, in fp32, rounded to bf16."""
    q, scales = reference.per_token_group_quant_fp8(x.reshape(-1, x.shape[-1]), 128)
    y = reference.fp8_gemm_nt((q, scales), weight)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def reference_swiglu_fp8(x: torch.Tensor, w13, w2) -> torch.Tensor:
    """The reference fp8_linear through the stacked gate and up weights, SiLU-and-mul rounded to bf16, then the
    reference fp8_linear through down (which quantizes that bf16 input, as the fused kernel does)."""
    return reference_fp8_linear(reference.silu_and_mul(reference_fp8_linear(x, w13)), w2)


def reference_mla_decode(q, kv_cache, batch: AttentionBatch, head_dim_v, softmax_scale, causal):
    return reference.mla_decode_with_kvcache(
        q, kv_cache, batch.block_table, batch.seq_lens, head_dim_v, softmax_scale, causal
    )


def kernel_mla_decode(q, kv_cache, batch: AttentionBatch, head_dim_v, softmax_scale, causal):
    """dsv3.ops' FlashMLA-style decode with the schedule `plan` computed for this step."""
    import dsv3.ops

    metadata, num_splits = batch.mla_schedule
    return dsv3.ops.mla_decode_with_kvcache(
        q, kv_cache, batch.block_table, batch.seq_lens, head_dim_v, metadata, num_splits, softmax_scale, causal
    )


REFERENCE_OPS: dict[str, Callable] = {
    "fp8_linear": reference_fp8_linear,
    "swiglu_fp8": reference_swiglu_fp8,
    "append_kv_cache": reference.append_kv_cache,
    "mla_decode_with_kvcache": reference_mla_decode,
    "grouped_topk": reference.grouped_topk,
    "fused_experts": reference.fused_experts,
    "rms_norm": reference.rms_norm,
    "fused_add_rms_norm": reference.fused_add_rms_norm,
    "apply_rope": reference.apply_rope,
}


def _kernel_op(op: str) -> Callable:
    import dsv3.ops
    from dsv3.ops.fused_moe import swiglu_fp8

    return {"mla_decode_with_kvcache": kernel_mla_decode, "swiglu_fp8": swiglu_fp8}.get(op) or getattr(dsv3.ops, op)


def compiled_kernels(device: torch.device) -> set[str]:
    """Names of the kernels the extension has for `device` (empty where it was built without them)."""
    from dsv3.ops import extension

    module = extension._C.cpu if device.type == "cpu" else getattr(extension._C, device.type, None)
    return {name for name in dir(module) if not name.startswith("_")} if module is not None else set()


def kernel_available(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    support = KERNEL_SUPPORT.get(op)
    if support is None or device.type not in support.devices or dtype not in support.dtypes:
        return False
    return support.kernel in compiled_kernels(device)


class Backend:
    def __init__(
        self, name: str = "reference", device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
    ):
        if name not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
        self.name = name
        device = torch.device(device)
        self.kernel_ops = [op for op in REFERENCE_OPS if name == "kernels" and kernel_available(op, device, dtype)]
        for op, reference_op in REFERENCE_OPS.items():
            setattr(self, op, _kernel_op(op) if op in self.kernel_ops else reference_op)

    def plan(self, batch: AttentionBatch, num_heads: int) -> AttentionBatch:
        """The batch with what every layer's attention shares computed once: the MLA decode schedule."""
        if not batch.absorbed or "mla_decode_with_kvcache" not in self.kernel_ops or batch.mla_schedule is not None:
            return batch
        import dsv3.ops

        schedule = dsv3.ops.get_mla_metadata(batch.seq_lens, batch.query_lens[0] * num_heads, 1)
        return dataclasses.replace(batch, mla_schedule=schedule)

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, kernels for: {', '.join(self.kernel_ops) or 'none'})"
