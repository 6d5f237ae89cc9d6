"""Tensor parallelism (attention heads, dense MLPs, shared experts) and expert parallelism (routed experts) of the model
over torch.distributed.

Layout, with W processes, tensor-parallel size tp and expert-parallel size ep (each divides W, one of them equals W):

* TP groups are runs of tp consecutive ranks; each group holds one full copy of the attention and dense weights
  (W / tp identical copies). Within a group, rank i holds heads [i*h/tp, (i+1)*h/tp): q_b_proj / kv_b_proj rows of
  those heads, o_proj columns of those heads, the latent cache in full (it is per token, shared by every head: each
  rank writes the same rows). Dense MLPs and the shared expert split gate/up by rows and down by columns. Row-split
  (input-sharded) layers return partial sums that are all-reduced in fp32 over the group.
* EP groups are runs of ep consecutive ranks; rank i holds routed experts [i*E/ep, (i+1)*E/ep), at full width, and
  only those are read from the checkpoint. Hidden states are identical on every rank before a MoE layer, so each rank
  routes all tokens, takes its share of them, dispatches that share to the experts' owners through dsv3.ep.Buffer
  (the shared expert runs meanwhile), runs its local experts, combines the results back and all-gathers the shares.
  Decode-sized bfloat16 batches use the low-latency exchanges and the masked grouped GEMMs instead.
* With ep == 1 and tp > 1 the routed experts are split like the dense MLP (intermediate rows/columns) instead, and
  their partial sums are all-reduced.
* Embedding, norms, router, kv_a/q_a projections, lm_head and the MTP module's own projections are replicated.

Every collective leaves bit-identical results on all the ranks that take part, so every rank computes the same
logits, samples the same tokens and runs the same schedule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3.model.config import ModelConfig
from dsv3.reference.quant import ceil_div

BLOCK = 128  # FP8 weight scale tiles are BLOCK x BLOCK
# Batches of at most this many tokens per EP rank take the low-latency exchanges into the masked expert layout.
LOW_LATENCY_TOKENS = 64

_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")

# How each decoder-block linear layer is split over a TP group, by the end of its name: "out" splits the rows
# (column-parallel), "in" the columns (row-parallel: the layer all-reduces its partial sums, except routed experts,
# whose MoE layer reduces their total once).
_ATTENTION_SPLITS = {"q_proj": "out", "q_b_proj": "out", "kv_b_proj": "out", "o_proj": "in"}
_MLP_SPLITS = {"gate_proj": "out", "up_proj": "out", "down_proj": "in"}


class ParallelConfigError(ValueError):
    """tensor/expert parallel sizes that do not fit the world size or the model."""


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParallelConfigError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_sizes(tensor_parallel_size: int, expert_parallel_size: int, world_size: int) -> None:
    """tp and ep each divide the world size, and one of them spans it (so every rank holds a share of the model that
    no other rank of its groups holds)."""
    tp = _positive_int(tensor_parallel_size, "tensor_parallel_size")
    ep = _positive_int(expert_parallel_size, "expert_parallel_size")
    if world_size % tp or world_size % ep or max(tp, ep) != world_size:
        raise ParallelConfigError(
            f"tensor_parallel_size={tp}, expert_parallel_size={ep} do not fit the world size {world_size}: each must "
            f"divide it and one of them must equal it"
        )


def check_model(config: ModelConfig, tp: int, ep: int) -> None:
    """The model splits evenly: heads and every MLP's intermediate size over tp, routed experts over ep."""
    if config.num_attention_heads % tp:
        raise ParallelConfigError(
            f"tensor_parallel_size={tp} does not divide num_attention_heads={config.num_attention_heads}"
        )
    if config.intermediate_size % tp:
        raise ParallelConfigError(
            f"tensor_parallel_size={tp} does not divide intermediate_size={config.intermediate_size}"
        )
    moe_layers = any(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    if moe_layers and config.moe_intermediate_size % tp:
        raise ParallelConfigError(
            f"tensor_parallel_size={tp} does not divide moe_intermediate_size={config.moe_intermediate_size}"
        )
    if moe_layers and config.n_routed_experts % ep:
        raise ParallelConfigError(
            f"expert_parallel_size={ep} does not divide n_routed_experts={config.n_routed_experts}"
        )


def shard_weight(
    weight: torch.Tensor, scale_inv: torch.Tensor | None, dim: int, parts: int, index: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Part `index` of `parts` equal slices of a checkpoint weight [N, K] along dim (0: rows, 1: columns).

    An FP8 weight keeps FP8 when the slice starts and ends on scale-tile boundaries (its scales are then the
    matching tiles); otherwise the slice is dequantized to fp32 here (exactly: value times its tile's scale), since
    a tile shared between two ranks has no FP8 form on either. Only the slice is read and copied.
    """
    size = weight.shape[dim] // parts
    start = index * size
    part = weight.narrow(dim, start, size).contiguous()
    if scale_inv is None:
        return part, None
    end = start + size
    if start % BLOCK == 0 and (end % BLOCK == 0 or end == weight.shape[dim]):
        tiles = scale_inv.narrow(dim, start // BLOCK, ceil_div(size, BLOCK)).contiguous()
        return part, tiles
    rows = torch.arange(start, end) // BLOCK  # the tile of each row (or column) of the slice
    tiles = scale_inv.index_select(dim, rows)  # one tile row/column per sliced row/column
    tiles = tiles.repeat_interleave(BLOCK, dim=1 - dim).narrow(1 - dim, 0, weight.shape[1 - dim])
    return part.float() * tiles, None


def _split_of(name: str) -> str | None:
    """The TP split of the linear layer `name` (a checkpoint name without .weight), None when replicated."""
    parent, _, leaf = name.rpartition(".")
    if parent.endswith(".self_attn"):
        return _ATTENTION_SPLITS.get(leaf)
    if parent.endswith(".mlp") or parent.endswith(".shared_experts") or ".experts." in name:
        return _MLP_SPLITS.get(leaf)
    return None


class Parallel:
    """This process's place in the tensor- and expert-parallel groups (every rank must construct it, in the same
    order, since it creates process groups). Parallel.single() is the single-process layout."""

    def __init__(self, tensor_parallel_size: int = 1, expert_parallel_size: int = 1):
        tp = _positive_int(tensor_parallel_size, "tensor_parallel_size")
        ep = _positive_int(expert_parallel_size, "expert_parallel_size")
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world == 1 and (tp > 1 or ep > 1):
            raise ParallelConfigError(
                f"tensor_parallel_size={tp}, expert_parallel_size={ep} need one process per rank: run under "
                f"torchrun --nproc-per-node {max(tp, ep)} (torch.distributed is "
                f"{'initialized with 1 process' if dist.is_initialized() else 'not initialized'})"
            )
        check_sizes(tp, ep, world)
        self.world_size, self.rank = world, dist.get_rank() if world > 1 else 0
        self.tp, self.ep = tp, ep
        self.tp_rank, self.ep_rank = self.rank % tp, self.rank % ep
        self.tp_group = self._group(tp)
        self.ep_group = self._group(ep)
        self._buffer = None

    @classmethod
    def single(cls) -> Parallel:
        """One process holding the whole model, whether or not torch.distributed is initialized."""
        self = cls.__new__(cls)
        self.world_size, self.rank, self.tp, self.ep = 1, 0, 1, 1
        self.tp_rank = self.ep_rank = 0
        self.tp_group = self.ep_group = self._buffer = None
        return self

    def _group(self, size: int):
        """The group of `size` consecutive ranks holding this rank (every rank creates every group, same order)."""
        if size == 1:
            return None
        if size == self.world_size:
            return dist.group.WORLD
        mine = None
        for first in range(0, self.world_size, size):
            group = dist.new_group(list(range(first, first + size)))
            if first <= self.rank < first + size:
                mine = group
        return mine

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def check(self, config: ModelConfig) -> None:
        check_model(config, self.tp, self.ep)

    # -- what this rank loads ---------------------------------------------------------------------------------------

    def local_experts(self, num_experts: int) -> range:
        per_rank = num_experts // self.ep
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def tensor_filter(self, config: ModelConfig):
        """name -> whether this rank reads the checkpoint tensor (routed experts of other EP ranks are skipped)."""
        local = self.local_experts(config.n_routed_experts)

        def keep(name: str) -> bool:
            match = _EXPERT.match(name)
            return match is None or int(match.group(1)) in local

        return keep

    def split_of(self, name: str) -> str | None:
        """How linear layer `name` is split over the TP group here (None: whole)."""
        if self.tp == 1 or (self.ep > 1 and ".experts." in name):
            return None
        return _split_of(name)

    def shard(self, name: str, weight: torch.Tensor, scale_inv: torch.Tensor | None):
        split = self.split_of(name)
        if split is None:
            return weight, scale_inv
        return shard_weight(weight, scale_inv, 0 if split == "out" else 1, self.tp, self.tp_rank)

    def reduces(self, name: str) -> bool:
        """Whether the output of linear layer `name` is a partial sum that its own call all-reduces (row-split
        layers, except routed experts, whose MoE layer reduces the sum of all of them once)."""
        return self.split_of(name) == "in" and ".experts." not in name

    # -- collectives -------------------------------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the TP group, added in fp32 and rounded once to x's dtype."""
        if self.tp == 1:
            return x
        total = x.float() if x.dtype != torch.float32 else x.clone()
        dist.all_reduce(total, group=self.tp_group)
        return total.to(x.dtype)

    def smallest(self, value: int) -> int:
        """The smallest of `value` over all ranks: sizes that the schedule depends on (the KV cache's pages) must be
        the same on every rank, which runs the same schedule."""
        if not self.distributed:
            return value
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        values = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
        return int(values)

    @property
    def buffer(self):
        if self._buffer is None:
            from dsv3.ep import Buffer

            self._buffer = Buffer(self.ep_group)
        return self._buffer

    def token_share(self, num_tokens: int) -> tuple[int, int]:
        """(first, count) of this EP rank's share of num_tokens: shares differ by at most one, lower ranks larger."""
        base, extra = divmod(num_tokens, self.ep)
        first = self.ep_rank * base + min(self.ep_rank, extra)
        return first, base + (self.ep_rank < extra)

    def gather_tokens(self, part: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The EP ranks' shares [count_r, H] (from token_share) -> [num_tokens, H] on every rank, bit for bit."""
        width = ceil_div(num_tokens, self.ep)
        padded = part.new_zeros(width, part.shape[1])
        padded[: part.shape[0]] = part
        pieces = [torch.empty_like(padded) for _ in range(self.ep)]
        dist.all_gather(pieces, padded, group=self.ep_group)
        counts = [divmod(num_tokens, self.ep)[0] + (r < num_tokens % self.ep) for r in range(self.ep)]
        return torch.cat([p[:c] for p, c in zip(pieces, counts, strict=True)])


@dataclass(frozen=True)
class RowParallelLinear:
    """A column-split linear layer whose partial outputs are summed over the TP group on every call."""

    linear: object
    parallel: Parallel

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.linear.dense_weight(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce(self.linear(x))


def expert_parallel_moe(
    moe, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, backend, overlap=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The routed-expert output [T, H] of a MoE layer whose experts are spread over the EP group, and overlap(x) (the
    shared expert; None when overlap is None), computed while the tokens are in flight.

    x [T, H], weights f32 [T, k] and experts int [T, k] (global ids) are the same on every EP rank. This rank's share
    of the tokens goes to the ranks owning their experts; each rank runs its local experts on what it receives
    (moe.routed_experts with local ids, -1 for experts elsewhere), weighted; the weighted sums come back and add up
    in fp32 at the source; the shares are gathered so that every rank returns all T rows.
    """
    parallel: Parallel = moe.parallel
    buffer = parallel.buffer
    first, count = parallel.token_share(x.shape[0])
    x_part, w_part, idx_part = (t[first : first + count].contiguous() for t in (x, weights, experts))
    # Every EP rank sees the same x, so every rank takes the same branch (the collectives must match).
    if moe.stacked is not None and x.dtype == torch.bfloat16 and x.shape[0] <= parallel.ep * LOW_LATENCY_TOKENS:
        return _low_latency_moe(moe, x_part, w_part, idx_part, x, backend, overlap)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx_part, moe.config.n_routed_experts)
    # FP8 experts quantize their tokens per 128 channels first; quantized before they travel, the tokens cross in
    # half the bytes and the experts compute the same bits.
    payload = x_part
    if moe.stacked is not None and x.dtype == torch.bfloat16:
        payload = _masked_ops(backend, x.device).per_token_group_quant_fp8(x_part)
    recv_x, recv_idx, recv_w, _, handle, event = buffer.dispatch(
        payload, topk_idx=idx_part, topk_weights=w_part, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, async_finish=overlap is not None,
    )  # fmt: skip
    shared = overlap(x) if overlap is not None else None
    if event is not None:
        event.wait()
    out = moe.routed_experts(recv_x, recv_w, recv_idx, backend)
    combined, _, _ = buffer.combine(out, handle)
    return parallel.gather_tokens(combined, x.shape[0]), shared


def _low_latency_moe(moe, x_part, w_part, idx_part, x, backend, overlap):
    """Decode-sized batches: FP8 tokens go straight into the masked per-expert layout (fixed-size exchanges), the two
    masked grouped GEMMs run on it, and the source adds its k weighted expert outputs in slot order.

    Every step quantizes, multiplies and adds as fused_experts does (per-token FP8 activations, the same GEMMs,
    SiLU-and-mul, the fp32 slot-order sum rounded once), so a token's result does not depend on where its experts
    live.
    """
    parallel: Parallel = moe.parallel
    ops = _masked_ops(backend, x.device)
    w13, w2 = moe.stacked
    (q, scales), masked_m, handle, event, _ = parallel.buffer.low_latency_dispatch(
        x_part, idx_part, LOW_LATENCY_TOKENS, moe.config.n_routed_experts, use_fp8=True,
        async_finish=overlap is not None,
    )  # fmt: skip
    shared = overlap(x) if overlap is not None else None
    if event is not None:
        event.wait()
    # T * R slots per expert; rows past masked_m[e] hold nothing and are never read back
    h = ops.m_grouped_fp8_gemm_nt_masked((q, scales), w13, masked_m, LOW_LATENCY_TOKENS)  # [L, T*R, 2I]
    y = ops.m_grouped_fp8_gemm_nt_masked(ops.silu_and_mul_quant_fp8(h), w2, masked_m, LOW_LATENCY_TOKENS)  # [L, T*R, H]
    combined, _, _ = parallel.buffer.low_latency_combine(y, idx_part, w_part, handle)
    return parallel.gather_tokens(combined, x.shape[0]), shared


def _masked_ops(backend, device: torch.device):
    """dsv3.ops where the model runs on kernels and they are compiled for the device, else the reference ops."""
    import dsv3.ops
    from dsv3 import reference

    return dsv3.ops if "fused_experts" in backend.kernel_ops else reference
