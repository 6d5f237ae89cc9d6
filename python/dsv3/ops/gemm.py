"""FP8 block-scaled GEMM (DeepGEMM's fp8_gemm_nt semantics) and the bf16-activation linear layer built on it."""

from __future__ import annotations

import torch

from dsv3.ops.extension import _C, cuda_index, custom_op, num_sms, run_kernel
from dsv3.ops.quant import per_token_group_quant_fp8
from dsv3.ops.tensor_checks import check_aligned, check_tensor
from dsv3.reference.quant import FP8_DTYPE, ceil_div

BLOCK = 128

FP8Pair = tuple[torch.Tensor, torch.Tensor]  # (e4m3 values, fp32 scales)


def _no_output(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out: torch.Tensor) -> None:
    return None


@custom_op("fp8_gemm_nt", fake=_no_output, mutates_args=("out",))
def _fp8_gemm_nt(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out: torch.Tensor) -> None:
    check_aligned(a=a, sa=sa, b=b, sb=sb, out=out)
    (m, k), n = a.shape, b.shape[0]
    pointers = (a.data_ptr(), sa.data_ptr(), b.data_ptr(), sb.data_ptr(), out.data_ptr())
    if a.device.type != "cuda":
        run_kernel("fp8_gemm_nt", a.device, *pointers, m, n, k)
        return
    sms = num_sms(cuda_index(a.device))
    workspace_bytes = _C.cuda.fp8_gemm_workspace_bytes(m, n, k, sms)
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=a.device) if workspace_bytes else None
    run_kernel("fp8_gemm_nt", a.device, *pointers, m, n, k, workspace.data_ptr() if workspace is not None else 0, sms)


def unpack_fp8_pair(pair: object, name: str) -> FP8Pair:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name}: expected a (values, scales) pair of tensors, got {type(pair).__name__}")
    return pair[0], pair[1]


def fp8_gemm_nt(a: FP8Pair, b: FP8Pair, out: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, N] bf16 = (a_q * a_scales) @ (b_q * b_scales)^T with fp32 accumulation.

    a: (e4m3 [M, K], f32 [M, ceil(K/128)]) - activations, one scale per token and 128 channels.
    b: (e4m3 [N, K], f32 [ceil(N/128), ceil(K/128)]) - weight, one scale per 128x128 tile.
    out: optional bf16 [M, N] to write into. Returns out.
    On CUDA, K must be a multiple of 16 and N of 8 (row strides of 16 bytes, as TMA requires).
    """
    qa, sa = unpack_fp8_pair(a, "a")
    qb, sb = unpack_fp8_pair(b, "b")
    check_tensor(qa, "a", dtypes=(FP8_DTYPE,), ndim=2)
    m, k = qa.shape
    check_tensor(qb, "b", dtypes=(FP8_DTYPE,), shape=(None, k), device=qa.device)
    n = qb.shape[0]
    check_tensor(sa, "a scales", dtypes=(torch.float32,), shape=(m, ceil_div(k, BLOCK)), device=qa.device)
    sb_shape = (ceil_div(n, BLOCK), ceil_div(k, BLOCK))
    check_tensor(sb, "b scales", dtypes=(torch.float32,), shape=sb_shape, device=qa.device)
    if qa.device.type == "cuda" and (k % 16 or n % 8):
        raise ValueError(f"a/b: on CUDA, K must be a multiple of 16 and N of 8 (TMA row alignment), got K={k}, N={n}")
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=qa.device)
    else:
        check_tensor(out, "out", dtypes=(torch.bfloat16,), shape=(m, n), device=qa.device)
    _fp8_gemm_nt(qa, sa, qb, sb, out)
    return out


def fp8_linear(x: torch.Tensor, weight: FP8Pair) -> torch.Tensor:
    """y [..., N] bf16 = x @ dequant(weight)^T with x quantized per token and 128 channels on the way in.

    x: bf16 [..., K]; weight: (e4m3 [N, K], f32 [ceil(N/128), ceil(K/128)]) as stored in the official checkpoint
    (`weight`, `weight_scale_inv`). K must be a multiple of 128. x may be a strided view (like F.linear's input).
    """
    check_tensor(x, "x", dtypes=(torch.bfloat16,), min_ndim=1, contiguous=False)
    q, scales = per_token_group_quant_fp8(x.reshape(-1, x.shape[-1]).contiguous(), BLOCK)
    y = fp8_gemm_nt((q, scales), weight)
    return y.reshape(*x.shape[:-1], y.shape[-1])
