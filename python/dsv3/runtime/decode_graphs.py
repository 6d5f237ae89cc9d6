"""Decode steps replayed from CUDA graphs.

A decode step of a small batch is a few hundred kernel launches of a few microseconds each, so on a GPU its time is
the host's: Python and the launches. The decode forward was built to run without host synchronization (the MLA
split-KV schedule and the MoE masked layout stay on the device), so it can be captured once per batch size and then
replayed: the step's inputs are copied into the graph's static buffers and one launch runs every layer.

Batches are padded up to the next captured size (1, 2, 4, ... 64). A padding row is an empty sequence: its cache
length is 0 (attention reads nothing and returns 0), its cache slot -1 (nothing is written), and its token only
takes a row in the MoE slabs, where every row is computed on its own. With MTP a step feeds two tokens a sequence
(last token and draft): the verification forward and the MTP module's drafting forward are two graphs over the same
static batch, the second fed the tokens the host chose after the first. A step is captured only while its tokens fit
the MoE masked layout (MASKED_MAX_TOKENS: the layout whose row counts stay on the device); larger steps run eagerly,
where the launches are spread over more tokens. Under tensor and expert parallelism (NCCL ranks under torchrun) the
step's exchanges are fixed-size too: all-reduces and all-gathers of the batch's rows, and for routed experts on other
ranks the low-latency dispatch and combine (dsv3.model.parallel: taken by batches of up to LOW_LATENCY_TOKENS tokens a
rank, and a captured step has no more in all), whose per-expert counts stay on the device. Every rank runs the same
schedule, so all capture the same sizes at the same steps, as their collectives require. Graphs are captured on first
use of each size and kept for the life of the LLM; they share one memory pool, and each replay's outputs are read
before the next.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsv3.model.batch import AttentionBatch
from dsv3.model.mlp import MoE
from dsv3.model.transformer import DeepseekV3
from dsv3.ops.fused_moe import MASKED_MAX_TOKENS
from dsv3.reference.mla import PAGE_SIZE
from dsv3.runtime.page_allocator import block_table
from dsv3.runtime.sequence import Sequence

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
# The decode ops whose reference versions read device values on the host (validity checks, per-sequence and
# per-expert loops).
CAPTURED_OPS = {"mla_decode_with_kvcache", "fused_experts", "append_kv_cache", "apply_rope"}


def capture_blocker(model: DeepseekV3) -> str | None:
    """Why the decode forward of `model` cannot be captured in a CUDA graph, or None when it can."""
    if model.device.type != "cuda":
        return f"the model runs on {model.device.type}, CUDA graphs need device='cuda'"
    if model.parallel.distributed and (not dist.is_initialized() or dist.get_backend() != "nccl"):
        return "tensor and expert parallelism capture their exchanges only over NCCL (the process group's backend)"
    if model.backend.name != "kernels" or model.dtype != torch.bfloat16:
        return "the decode path syncs with the host unless it runs the bfloat16 kernels (dtype='bfloat16')"
    missing = sorted(CAPTURED_OPS - set(model.backend.kernel_ops))
    if missing:
        return f"this build has no CUDA kernel for {', '.join(missing)}, and the reference ops sync with the host"
    blocks = [*model.layers, *(m.block for m in model.mtp)]
    if any(isinstance(block.mlp, MoE) and block.mlp.stacked is None for block in blocks):
        return "a MoE layer's experts are not FP8 with 128-wide blocks, so they run one by one on host-read counts"
    return None


class _Graph:
    """One captured decode step for `size` sequences feeding `fed` tokens each (1: plain decode; 2: MTP verification,
    whose step also captures the MTP module's drafting forward as a second graph over the same batch), with its
    static inputs and outputs."""

    def __init__(self, model: DeepseekV3, kv_layers: list[torch.Tensor], size: int, fed: int, max_pages: int, pool):
        device, rows = model.device, size * fed
        self.size, self.fed = size, fed
        self.ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.next_ids = torch.zeros(rows, dtype=torch.int64, device=device)  # MTP: the token after each fed one
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.block_table = torch.zeros(size, max_pages, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        batch = AttentionBatch(
            query_lens=(fed,) * size,
            positions=self.positions,
            slot_mapping=self.slot_mapping,
            block_table=self.block_table,
            seq_lens=self.seq_lens,
            cached_lens=(0,) * size,  # read only by the unabsorbed (prefill) attention
        )

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            hidden = model.forward(self.ids, batch, kv_layers)
            return hidden, model.logits(hidden)

        def draft(hidden: torch.Tensor) -> torch.Tensor:
            return model.mtp_logits(self.next_ids, hidden, batch, kv_layers)

        # Every row is padding while capturing: nothing is read from or written to the cache.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            hidden, _ = step()  # first calls allocate workspaces and load kernels outside the capture
            if fed == 2:
                draft(hidden)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, stream=stream):
                self.hidden, self.logits = step()
            if fed == 2:
                self.draft_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.draft_graph, pool=pool, stream=stream):
                    self.mtp_logits = draft(self.hidden)
        torch.cuda.current_stream(device).wait_stream(stream)

    def run(self, sequences: list[Sequence]) -> torch.Tensor:
        """fp32 logits [b * fed, vocab] of the step, overwritten by the next replay."""
        inputs = padded_decode_inputs(sequences, self.size, self.fed)
        for name in ("ids", "positions", "slot_mapping", "seq_lens"):
            getattr(self, name).copy_(inputs[name], non_blocking=True)
        # columns past a sequence's pages are never read (its length bounds the pages the kernel visits)
        table = inputs["block_table"]
        self.block_table[: table.shape[0], : table.shape[1]].copy_(table, non_blocking=True)
        self.graph.replay()
        return self.logits[: len(sequences) * self.fed]

    def draft(self, next_ids: list[int]) -> torch.Tensor:
        """MTP logits [len(next_ids), vocab] after run(): next_ids holds the token after each fed one, in row order."""
        padding = [0] * (self.size * self.fed - len(next_ids))
        self.next_ids.copy_(torch.tensor(next_ids + padding), non_blocking=True)
        self.draft_graph.replay()
        return self.mtp_logits[: len(next_ids)]


def padded_decode_inputs(sequences: list[Sequence], size: int, fed: int = 1) -> dict[str, torch.Tensor]:
    """A decode step's inputs on the host, padded to `size` sequences of `fed` tokens (1: each sequence's last token;
    2: its last token and its MTP draft): ids, positions and slot_mapping (int64 [size * fed]), seq_lens (int32
    [size]); block_table int32 [b, widest page list] holds the real rows only."""
    pad = (size - len(sequences)) * fed
    starts = [s.num_computed for s in sequences]
    positions = [p + j for p in starts for j in range(fed)]
    slots = [
        s.pages[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE
        for s, start in zip(sequences, starts, strict=True)
        for p in range(start, start + fed)
    ]
    ids = [t for s in sequences for t in ([s.token_ids[-1]] if fed == 1 else [s.token_ids[-1], s.draft])]
    return {
        "ids": torch.tensor(ids + [0] * pad),
        "positions": torch.tensor(positions + [0] * pad),
        "slot_mapping": torch.tensor(slots + [-1] * pad),
        "seq_lens": torch.tensor([p + fed for p in starts] + [0] * (size - len(sequences)), dtype=torch.int32),
        "block_table": block_table([s.pages for s in sequences]),
    }


class DecodeGraphs:
    """Captured decode steps of one model and cache, by padded batch size and tokens fed per sequence."""

    def __init__(self, model: DeepseekV3, kv_layers: list[torch.Tensor], max_pages: int):
        blocker = capture_blocker(model)
        if blocker is not None:
            raise ValueError(f"cuda_graphs: {blocker}")
        self.model, self.kv_layers, self.max_pages = model, kv_layers, max_pages
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def graph_for(self, sequences: list[Sequence], fed: int) -> _Graph | None:
        """The graph that runs a step of `sequences` feeding `fed` tokens each (captured on first use), or None when
        the step's padded tokens would exceed MASKED_MAX_TOKENS or a sequence has more pages than the graphs' block
        table holds (the caller runs that step eagerly)."""
        fits = (n for n in GRAPH_BATCH_SIZES if n >= len(sequences) and n * fed <= MASKED_MAX_TOKENS)
        size = next(fits, None)
        if size is None or any(len(s.pages) > self.max_pages for s in sequences):
            return None
        if (size, fed) not in self.graphs:
            self.graphs[size, fed] = _Graph(self.model, self.kv_layers, size, fed, self.max_pages, self.pool)
        return self.graphs[size, fed]
