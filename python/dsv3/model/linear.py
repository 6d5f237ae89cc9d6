"""A linear layer over a checkpoint weight, in the form the model's dtype calls for."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model.backend import Backend
from dsv3.reference.gemm import dequant_weight


class Linear:
    """y = x @ W.T for a checkpoint weight W [N, K], stored FP8 (+ block scale_inv) or bf16.

    float32 model: W is dequantized once to fp32 (exact) and applied with F.linear.
    bfloat16 model: FP8 weights stay FP8 and go through the backend's fp8_linear (activations quantized per token
    and 128 channels on the way in, as DeepSeek-V3 was trained); bf16 weights use F.linear.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        scale_inv: torch.Tensor | None,
        dtype: torch.dtype,
        backend: Backend,
        device: torch.device,
    ):
        self.backend = backend
        self.fp8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dense: torch.Tensor | None = None
        if scale_inv is not None and dtype == torch.bfloat16:
            if weight.shape[1] % 128:
                raise ValueError(f"FP8 weight {tuple(weight.shape)}: the input width must be a multiple of 128")
            self.fp8 = (weight.to(device), scale_inv.to(device))
        elif scale_inv is not None:
            self.dense = dequant_weight(weight.to(device), scale_inv.to(device)).to(dtype)
        else:
            self.dense = weight.to(device=device, dtype=dtype)

    @property
    def out_features(self) -> int:
        return (self.dense if self.fp8 is None else self.fp8[0]).shape[0]

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W [N, K] in `dtype` (dequantized if stored FP8), for weights the model rearranges, e.g. MLA absorption."""
        if self.fp8 is None:
            return self.dense.to(dtype)
        return dequant_weight(*self.fp8).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is None:
            return F.linear(x, self.dense)
        return self.backend.fp8_linear(x, self.fp8)
