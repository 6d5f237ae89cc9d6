"""The ops the model calls, chosen once: "reference" (dsv3.reference, fp32 PyTorch) or "kernels" (dsv3.ops).

With "kernels", each op comes from dsv3.ops when dsv3.ops has it and it runs on the model's device (checked with a tiny
call when the backend is built); otherwise the reference op is used, so the model always runs and `kernel_ops` says
which ops are compiled. Both backends share one signature per op:

  fp8_linear(x bf16 [..., K], (e4m3 [N, K], f32 [ceil(N/128), ceil(K/128)])) -> bf16 [..., N]
  append_kv_cache(kv_cache, slot_mapping, latent, rope)                       (dsv3.reference.mla)
  mla_decode_with_kvcache(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal) -> (out, lse)
  grouped_topk(router_logits, correction_bias, topk, num_expert_group, topk_group, routed_scaling_factor, renormalize)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv3 import reference
from dsv3.reference.quant import FP8_DTYPE

BACKENDS = ("reference", "kernels")


def reference_fp8_linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x quantized per token and 128 channels, times the block-scaled weight, in fp32, rounded to bf16."""
    q, scales = reference.per_token_group_quant_fp8(x.reshape(-1, x.shape[-1]), 128)
    y = reference.fp8_gemm_nt((q, scales), weight)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def kernel_mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    """dsv3.ops' FlashMLA-style decode, with the split-KV schedule computed for this batch."""
    import dsv3.ops

    metadata, num_splits = dsv3.ops.get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2], 1)
    return dsv3.ops.mla_decode_with_kvcache(
        q, kv_cache, block_table, cache_seqlens, head_dim_v, metadata, num_splits, softmax_scale, causal
    )


def _kernel(op: str) -> Callable | None:
    """The dsv3.ops implementation of `op` in the backend's signature, if dsv3.ops has one."""
    import dsv3.ops

    return kernel_mla_decode if op == "mla_decode_with_kvcache" else getattr(dsv3.ops, op, None)


def _probes(device: torch.device) -> dict[str, tuple[Callable[[], tuple], Callable]]:
    """op name -> (arguments of a minimal call on `device`, reference implementation)."""

    def linear_args():
        return torch.zeros(1, 128, dtype=torch.bfloat16, device=device), (
            torch.zeros(8, 128, dtype=FP8_DTYPE, device=device),
            torch.ones(1, 1, device=device),
        )

    def cache():
        return torch.zeros(1, reference.PAGE_SIZE, 1, reference.HEAD_DIM, dtype=torch.bfloat16, device=device)

    def append_args():
        latent = torch.zeros(1, reference.LATENT_DIM, dtype=torch.bfloat16, device=device)
        rope = torch.zeros(1, reference.ROPE_DIM, dtype=torch.bfloat16, device=device)
        return cache(), torch.zeros(1, dtype=torch.int64, device=device), latent, rope

    def decode_args():
        q = torch.zeros(1, 1, 1, reference.HEAD_DIM, dtype=torch.bfloat16, device=device)
        table = torch.zeros(1, 1, dtype=torch.int32, device=device)
        return q, cache(), table, torch.ones(1, dtype=torch.int32, device=device), reference.LATENT_DIM, 1.0, False

    def topk_args():
        return torch.zeros(1, 4, device=device), torch.zeros(4, device=device), 1, 2, 1, 1.0

    return {
        "fp8_linear": (linear_args, reference_fp8_linear),
        "append_kv_cache": (append_args, reference.append_kv_cache),
        "mla_decode_with_kvcache": (decode_args, reference.mla_decode_with_kvcache),
        "grouped_topk": (topk_args, reference.grouped_topk),
    }


class Backend:
    def __init__(self, name: str = "reference", device: str | torch.device = "cpu"):
        if name not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
        self.name = name
        self.kernel_ops: list[str] = []
        for op, (make_args, reference_op) in _probes(torch.device(device)).items():
            chosen = reference_op
            if name == "kernels":
                kernel = _working_kernel(op, make_args)
                if kernel is not None:
                    chosen = kernel
                    self.kernel_ops.append(op)
            setattr(self, op, chosen)

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, kernels for: {', '.join(self.kernel_ops) or 'none'})"


def _working_kernel(op: str, make_args: Callable[[], tuple]) -> Callable | None:
    kernel = _kernel(op)
    if kernel is None:
        return None
    try:
        kernel(*make_args())
    except (RuntimeError, NotImplementedError):  # declared, but not compiled for this device yet
        return None
    return kernel
