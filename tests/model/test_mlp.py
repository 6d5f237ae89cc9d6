"""The dense SwiGLU MLP: FP8 gate and up stacked into one weight at load, one backend call a forward."""

from __future__ import annotations

import pytest
import torch

from dsv3.model.backend import Backend
from dsv3.model.linear import Linear
from dsv3.model.mlp import MLP
from dsv3.model.parallel import RowParallelLinear
from dsv3.reference import per_block_quant_fp8, silu_and_mul

HIDDEN = 256


class _DoublingGroup:
    """A stand-in for the tensor-parallel group: all_reduce doubles (what two ranks with equal partials would sum)."""

    def __init__(self):
        self.calls = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 2


def _linears(inter: int, backend: Backend) -> dict[str, Linear]:
    gen = torch.Generator().manual_seed(inter)
    shapes = {"gate_proj": (inter, HIDDEN), "up_proj": (inter, HIDDEN), "down_proj": (HIDDEN, inter)}
    linears = {}
    for name, shape in shapes.items():
        q, s = per_block_quant_fp8(torch.randn(*shape, generator=gen) * 0.05)
        linears[name] = Linear(q, s, torch.bfloat16, backend, torch.device("cpu"))
    return linears


def _unfused(linears: dict[str, Linear], x: torch.Tensor) -> torch.Tensor:
    h = torch.cat([linears["gate_proj"](x), linears["up_proj"](x)], dim=-1)
    return linears["down_proj"](silu_and_mul(h))


@pytest.mark.parametrize("backend_name", ["reference", "kernels"])
def test_fp8_mlp_stacks_gate_and_up_and_matches_the_separate_projections(backend_name):
    backend = Backend(backend_name, "cpu", torch.bfloat16)
    linears = _linears(384, backend)
    mlp = MLP(lambda name: linears[name.split(".")[-1]], "mlp")
    assert mlp.fp8 is not None and mlp.gate_proj is None and mlp.up_proj is None
    assert mlp.fp8[0][0].shape == (768, HIDDEN) and mlp.fp8[0][1].shape == (6, 2)
    x = torch.randn(5, HIDDEN, dtype=torch.bfloat16)
    expected = _unfused(linears, x)
    out = mlp(x)
    if backend_name == "reference":  # the same reference ops in the same order
        assert torch.equal(out, expected)
    else:  # the fused SiLU's exp may differ from torch's in the last bit, which can move an FP8 code by one step
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_fp8_mlp_with_a_row_parallel_down_projection_reduces_once():
    backend = Backend("kernels", "cpu", torch.bfloat16)
    linears = _linears(256, backend)
    group = _DoublingGroup()
    row_parallel = {**linears, "down_proj": RowParallelLinear(linears["down_proj"], group)}
    mlp = MLP(lambda name: row_parallel[name.split(".")[-1]], "mlp")
    assert mlp.fp8 is not None
    x = torch.randn(3, HIDDEN, dtype=torch.bfloat16)
    assert torch.equal(mlp(x), MLP(lambda name: linears[name.split(".")[-1]], "mlp")(x) * 2)
    assert group.calls == 1


def test_mlp_of_a_float32_model_keeps_its_dequantized_projections():
    backend = Backend("kernels", "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    linears = {}
    for name, shape in {"gate_proj": (128, HIDDEN), "up_proj": (128, HIDDEN), "down_proj": (HIDDEN, 128)}.items():
        q, s = per_block_quant_fp8(torch.randn(*shape, generator=gen))
        linears[name] = Linear(q, s, torch.float32, backend, torch.device("cpu"))
    mlp = MLP(lambda name: linears[name.split(".")[-1]], "mlp")
    assert mlp.fp8 is None
    x = torch.randn(2, HIDDEN)
    assert torch.equal(mlp(x), _unfused(linears, x))
