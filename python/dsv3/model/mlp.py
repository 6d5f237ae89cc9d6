"""The feed-forward half of a layer: a dense SwiGLU MLP, or DeepSeekMoE (routed experts + shared expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model.backend import Backend
from dsv3.model.config import ModelConfig
from dsv3.model.parallel import Parallel, expert_parallel_moe
from dsv3.reference.layers import silu_and_mul


class MLP:
    """down(silu(gate(x)) * up(x)).

    With FP8 projections (a bfloat16 model; down's input width, the intermediate size, is then a multiple of 128, so
    gate's and up's rows are whole scale tiles) gate and up are stacked once at load into one [2I, H] weight, `fp8` =
    (w13, w2), and a call is the backend's swiglu_fp8: x quantized once, two FP8 GEMMs, SiLU-and-mul fused with the
    down GEMM's input quantization. A row-parallel down projection still sums its partial outputs over the
    tensor-parallel group.
    """

    def __init__(self, make_linear, prefix: str):
        self.gate_proj = make_linear(f"{prefix}.gate_proj")
        self.up_proj = make_linear(f"{prefix}.up_proj")
        self.down_proj = make_linear(f"{prefix}.down_proj")
        down = getattr(self.down_proj, "linear", self.down_proj)  # a RowParallelLinear wraps the Linear
        self.reduce = self.down_proj.parallel.all_reduce if down is not self.down_proj else None
        self.backend = down.backend
        self.fp8 = None
        gate, up = self.gate_proj.fp8, self.up_proj.fp8
        if gate is not None and up is not None and down.fp8 is not None:
            self.fp8 = (tuple(torch.cat([gate[i], up[i]]) for i in (0, 1)), down.fp8)
            self.gate_proj = self.up_proj = None  # the stacked copy replaces them

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is None:
            return self.down_proj(silu_and_mul(torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)))
        out = self.backend.swiglu_fp8(x, *self.fp8)
        return out if self.reduce is None else self.reduce(out)


class MoE:
    """Routed experts chosen by the noaux_tc router, weighted and summed, plus the shared expert.

    The router's logits are computed in fp32 from the fp32-widened input (the checkpoint keeps the router in bf16,
    its correction bias in fp32); the weighted expert outputs are summed in fp32 and rounded once, then the shared
    expert's output is added in the model dtype. With FP8 expert weights (a bfloat16 model) the experts, and the
    shared expert, are stacked once at load time and run as one fused_experts call (grouped FP8 GEMMs); otherwise
    each expert runs as its own MLP.
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        make_linear,
        device: torch.device,
        parallel: Parallel | None = None,
    ):
        self.config = config
        self.parallel = parallel or Parallel.single()
        self.gate = weights["gate.weight"].to(device=device, dtype=torch.float32)  # [E, hidden]
        self.correction_bias = weights["gate.e_score_correction_bias"].to(device=device, dtype=torch.float32)
        # This rank's experts: all of them without expert parallelism (split by width when tensor-parallel).
        local = self.parallel.local_experts(config.n_routed_experts)
        experts = [MLP(make_linear, f"experts.{e}") for e in local]
        self.stacked = _stack_fp8_experts(experts)
        self.experts = experts if self.stacked is None else None  # the stacked copy replaces the per-expert weights
        self.shared = MLP(make_linear, "shared_experts") if config.n_shared_experts else None
        # In one process the shared expert goes into the fused call when it is FP8 too (its intermediate size is a
        # multiple of 128 whenever the routed experts' is: n_shared_experts * moe_intermediate_size). Parallel runs
        # keep it apart: expert parallelism computes it once per token while the tokens travel, and a tensor-parallel
        # shared expert sums its partial output over the ranks itself.
        self.shared_stacked = None
        single = self.parallel.tp == self.parallel.ep == 1
        if single and self.stacked is not None and self.shared is not None and self.shared.fp8 is not None:
            self.shared_stacked = self.shared.fp8
            self.shared = None  # the stacked copy replaces its projections

    def __call__(self, x: torch.Tensor, backend: Backend) -> torch.Tensor:
        c = self.config
        logits = F.linear(x.float(), self.gate)  # [T, E]
        weights, experts = backend.grouped_topk(
            logits,
            self.correction_bias,
            c.num_experts_per_tok,
            c.n_group,
            c.topk_group,
            c.routed_scaling_factor,
            c.norm_topk_prob,
        )  # f32 [T, k], int32 [T, k]
        if self.parallel.ep > 1:
            # The shared expert runs while this rank's tokens travel to their experts.
            out, shared = expert_parallel_moe(self, x, weights, experts, backend, self.shared)
            return out if shared is None else out + shared
        # Tensor-parallel experts return partial sums over their slice of the intermediate size.
        out = self.parallel.all_reduce(self.routed_experts(x, weights, experts, backend))
        return out if self.shared is None else out + self.shared(x)

    def routed_experts(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, backend: Backend
    ) -> torch.Tensor:
        """x [T, H], weights f32 [T, k], experts int [T, k] as ids of this rank's experts (-1: none) -> the weighted
        sum of each token's experts [T, H] in x's dtype (added in fp32, rounded once)."""
        if self.stacked is not None:
            shared = self.shared_stacked or ()
            return backend.fused_experts(x, weights, experts.int(), *self.stacked, *shared)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for expert in experts.unique().tolist():
            if expert < 0:
                continue
            tokens, slots = (experts == expert).nonzero(as_tuple=True)
            y = self.experts[expert](x[tokens])
            out.index_add_(0, tokens, y.float() * weights[tokens, slots, None])
        return out.to(x.dtype)


def _stack_fp8_experts(experts: list[MLP]):
    """(w13, w2) for fused_experts: gate and up stacked per expert [E, 2I, H], down [E, H, I], FP8 with block scales;
    None unless every expert has its stacked FP8 weights (a float32 model dequantizes them)."""
    if any(e.fp8 is None for e in experts):
        return None
    w13 = tuple(torch.stack([e.fp8[0][i] for e in experts]) for i in (0, 1))
    w2 = tuple(torch.stack([e.fp8[1][i] for e in experts]) for i in (0, 1))
    return w13, w2
