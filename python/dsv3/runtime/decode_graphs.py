"""Decode steps replayed from CUDA graphs.

A decode step of a small batch is a few hundred kernel launches of a few microseconds each, so on a GPU its time is
the host's: Python and the launches. The decode forward was built to run without host synchronization (the MLA
split-KV schedule and the MoE masked layout stay on the device), so it can be captured once per batch size and then
replayed: the step's inputs are copied into the graph's static buffers and one launch runs every layer.

Batches are padded up to the next captured size (1, 2, 4, ... 64). A padding row is an empty sequence: its cache
length is 0 (attention reads nothing and returns 0), its cache slot -1 (nothing is written), and its token only
takes a row in the MoE slabs, where every row is computed on its own. Larger batches run eagerly, where the launches
are spread over more tokens (and the contiguous MoE layout takes over). Graphs are captured on first use of each size
and kept for the life of the LLM; they share one memory pool, and each replay's logits are read before the next.
"""

from __future__ import annotations

import torch

from dsv3.model.batch import AttentionBatch
from dsv3.model.mlp import MoE
from dsv3.model.transformer import DeepseekV3
from dsv3.reference.mla import PAGE_SIZE
from dsv3.runtime.sequence import Sequence

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
# The decode ops whose reference versions read device values on the host (validity checks, per-sequence and
# per-expert loops).
CAPTURED_OPS = {"mla_decode_with_kvcache", "fused_experts", "append_kv_cache", "apply_rope"}


def capture_blocker(model: DeepseekV3) -> str | None:
    """Why the decode forward of `model` cannot be captured in a CUDA graph, or None when it can."""
    if model.device.type != "cuda":
        return f"the model runs on {model.device.type}, CUDA graphs need device='cuda'"
    if model.parallel.world_size > 1:
        return "tensor and expert parallelism exchange data whose sizes the host reads; run them without graphs"
    if model.backend.name != "kernels" or model.dtype != torch.bfloat16:
        return "the decode path syncs with the host unless it runs the bfloat16 kernels (dtype='bfloat16')"
    missing = sorted(CAPTURED_OPS - set(model.backend.kernel_ops))
    if missing:
        return f"this build has no CUDA kernel for {', '.join(missing)}, and the reference ops sync with the host"
    if any(isinstance(layer.mlp, MoE) and layer.mlp.stacked is None for layer in model.layers):
        return "a MoE layer's experts are not FP8 with 128-wide blocks, so they run one by one on host-read counts"
    return None


class _Graph:
    """One captured decode step for `size` sequences, with its static inputs and output."""

    def __init__(self, model: DeepseekV3, kv_layers: list[torch.Tensor], size: int, max_pages: int, pool):
        device = model.device
        self.ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.block_table = torch.zeros(size, max_pages, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        batch = AttentionBatch(
            query_lens=(1,) * size,
            positions=self.positions,
            slot_mapping=self.slot_mapping,
            block_table=self.block_table,
            seq_lens=self.seq_lens,
            cached_lens=(0,) * size,  # read only by the unabsorbed (prefill) attention
        )

        def step() -> torch.Tensor:
            return model.logits(model.forward(self.ids, batch, kv_layers))

        # Every row is padding while capturing: nothing is read from or written to the cache.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            step()  # first calls allocate workspaces and load kernels outside the capture
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, stream=stream):
                self.logits = step()
        torch.cuda.current_stream(device).wait_stream(stream)

    def run(self, sequences: list[Sequence]) -> torch.Tensor:
        inputs = padded_decode_inputs(sequences, self.ids.shape[0])
        for buffer, name in ((self.ids, "ids"), (self.positions, "positions"), (self.slot_mapping, "slot_mapping")):
            buffer.copy_(inputs[name], non_blocking=True)
        self.seq_lens.copy_(inputs["seq_lens"], non_blocking=True)
        # columns past a sequence's pages are never read (its length bounds the pages the kernel visits)
        table = inputs["block_table"]
        self.block_table[: table.shape[0], : table.shape[1]].copy_(table, non_blocking=True)
        self.graph.replay()
        return self.logits[: len(sequences)]


def padded_decode_inputs(sequences: list[Sequence], size: int) -> dict[str, torch.Tensor]:
    """A decode step's inputs on the host, padded to `size` rows: ids, positions and slot_mapping (int64 [size]),
    seq_lens (int32 [size]); block_table int32 [b, widest page list] holds the real rows only."""
    pad = size - len(sequences)
    positions = [s.num_computed for s in sequences]
    slots = [s.pages[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for s, p in zip(sequences, positions, strict=True)]
    width = max(len(s.pages) for s in sequences)
    return {
        "ids": torch.tensor([s.token_ids[-1] for s in sequences] + [0] * pad),
        "positions": torch.tensor(positions + [0] * pad),
        "slot_mapping": torch.tensor(slots + [-1] * pad),
        "seq_lens": torch.tensor([p + 1 for p in positions] + [0] * pad, dtype=torch.int32),
        "block_table": torch.tensor([s.pages + [0] * (width - len(s.pages)) for s in sequences], dtype=torch.int32),
    }


class DecodeGraphs:
    """Captured decode steps of one model and cache, by padded batch size."""

    def __init__(self, model: DeepseekV3, kv_layers: list[torch.Tensor], max_pages: int):
        blocker = capture_blocker(model)
        if blocker is not None:
            raise ValueError(f"cuda_graphs: {blocker}")
        self.model, self.kv_layers, self.max_pages = model, kv_layers, max_pages
        self.graphs: dict[int, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def logits(self, sequences: list[Sequence]) -> torch.Tensor | None:
        """fp32 logits [b, vocab] of one decode step of `sequences` (each adding its last token), from a graph; None
        when the batch is larger than the largest captured size or a sequence has more pages than the graphs' block
        table holds (the caller runs it eagerly)."""
        size = next((n for n in GRAPH_BATCH_SIZES if n >= len(sequences)), None)
        if size is None or any(len(s.pages) > self.max_pages for s in sequences):
            return None
        if size not in self.graphs:
            self.graphs[size] = _Graph(self.model, self.kv_layers, size, self.max_pages, self.pool)
        return self.graphs[size].run(sequences)
