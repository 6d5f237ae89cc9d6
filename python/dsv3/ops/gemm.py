"""FP8 block-scaled GEMM (DeepGEMM's fp8_gemm_nt semantics) and the bf16-activation linear layer built on it."""

from __future__ import annotations

import torch

from dsv3.ops.extension import _C, DTYPE_CODES, cuda_index, custom_op, num_sms, run_kernel
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


def _check_weight(weight: FP8Pair, k: int, device: torch.device, name: str) -> FP8Pair:
    """The (e4m3 [N, k], f32 [ceil(N/128), ceil(k/128)]) operand of both GEMM entry points."""
    qb, sb = unpack_fp8_pair(weight, name)
    check_tensor(qb, name, dtypes=(FP8_DTYPE,), shape=(None, k), device=device)
    sb_shape = (ceil_div(qb.shape[0], BLOCK), ceil_div(k, BLOCK))
    check_tensor(sb, f"{name} scales", dtypes=(torch.float32,), shape=sb_shape, device=device)
    if device.type == "cuda" and qb.shape[0] % 8:
        raise ValueError(f"{name}: on CUDA, N must be a multiple of 8 (TMA row alignment), got N={qb.shape[0]}")
    return qb, sb


def fp8_gemm_nt(a: FP8Pair, b: FP8Pair, out: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, N] bf16 = (a_q * a_scales) @ (b_q * b_scales)^T with fp32 accumulation.

    a: (e4m3 [M, K], f32 [M, ceil(K/128)]) - activations, one scale per token and 128 channels.
    b: (e4m3 [N, K], f32 [ceil(N/128), ceil(K/128)]) - weight, one scale per 128x128 tile.
    out: optional bf16 [M, N] to write into. Returns out.
    On CUDA, K must be a multiple of 16 and N of 8 (row strides of 16 bytes, as TMA requires).
    """
    qa, sa = unpack_fp8_pair(a, "a")
    check_tensor(qa, "a", dtypes=(FP8_DTYPE,), ndim=2)
    m, k = qa.shape
    check_tensor(sa, "a scales", dtypes=(torch.float32,), shape=(m, ceil_div(k, BLOCK)), device=qa.device)
    if qa.device.type == "cuda" and k % 16:
        raise ValueError(f"a: on CUDA, K must be a multiple of 16 (TMA row alignment), got K={k}")
    qb, sb = _check_weight(b, k, qa.device, "b")
    n = qb.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=qa.device)
    else:
        check_tensor(out, "out", dtypes=(torch.bfloat16,), shape=(m, n), device=qa.device)
    _fp8_gemm_nt(qa, sa, qb, sb, out)
    return out


def _no_linear_output(x: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out: torch.Tensor) -> None:
    return None


@custom_op("fp8_linear", fake=_no_linear_output, mutates_args=("out",))
def _fp8_linear(x: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out: torch.Tensor) -> None:
    check_aligned(x=x, b=b, sb=sb, out=out)
    (m, k), n = x.shape, b.shape[0]
    args = (x.data_ptr(), DTYPE_CODES[x.dtype], b.data_ptr(), sb.data_ptr(), out.data_ptr(), m, n, k)
    if x.device.type != "cuda":
        run_kernel("fp8_linear", x.device, *args)
        return
    sms = num_sms(cuda_index(x.device))
    workspace = torch.empty(_C.cuda.fp8_linear_workspace_bytes(m, n, k, sms), dtype=torch.uint8, device=x.device)
    run_kernel("fp8_linear", x.device, *args, workspace.data_ptr(), sms)


def fp8_linear(x: torch.Tensor, weight: FP8Pair) -> torch.Tensor:
    """y [..., N] bf16 = x @ dequant(weight)^T with x quantized per token and 128 channels on the way in.

    x: bf16 [..., K]; weight: (e4m3 [N, K], f32 [ceil(N/128), ceil(K/128)]) as stored in the official checkpoint
    (`weight`, `weight_scale_inv`). K must be a multiple of 128. x may be a strided view (like F.linear's input).
    Equal, bit for bit, to fp8_gemm_nt(per_token_group_quant_fp8(x), weight); the quantized activations live only
    inside the op (in scratch on the CPU, in one workspace allocation on CUDA).
    """
    check_tensor(x, "x", dtypes=(torch.bfloat16,), min_ndim=1, contiguous=False)
    k = x.shape[-1]
    if k % BLOCK:
        raise ValueError(f"x: the input width must be a multiple of {BLOCK}, got {k}")
    qb, sb = _check_weight(weight, k, x.device, "weight")
    rows = x.reshape(-1, k).contiguous()
    out = torch.empty(rows.shape[0], qb.shape[0], dtype=torch.bfloat16, device=x.device)
    _fp8_linear(rows, qb, sb, out)
    return out.reshape(*x.shape[:-1], qb.shape[0])
