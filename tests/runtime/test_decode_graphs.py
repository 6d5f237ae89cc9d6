"""CUDA-graph decode (dsv3.runtime.decode_graphs) where no GPU is needed: the models it refuses, and the padded batch
it replays — padding rows must leave the real rows' logits and the cache as an unpadded step leaves them. The capture
and replay themselves are tested in tests/cuda/test_runtime_cuda.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dsv3.model.batch import AttentionBatch
from dsv3.model.parallel import LOW_LATENCY_TOKENS
from dsv3.model.transformer import DeepseekV3
from dsv3.ops.fused_moe import MASKED_MAX_TOKENS
from dsv3.runtime import LLM
from dsv3.runtime.decode_graphs import CAPTURED_OPS, GRAPH_BATCH_SIZES, capture_blocker, padded_decode_inputs
from dsv3.runtime.page_allocator import PageList
from dsv3.testing import assert_bitwise_equal, calc_diff


def test_refused_configurations_name_the_argument_and_the_reason(tiny):
    with pytest.raises(ValueError, match="cuda_graphs: the model runs on cpu, CUDA graphs need device='cuda'"):
        LLM(tiny, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs: expected True or False, got 1"):
        LLM(tiny, cuda_graphs=1)
    model = DeepseekV3.from_pretrained(tiny, dtype="float32")
    assert "device='cuda'" in capture_blocker(model)


def _cuda_model_over_two_ranks() -> SimpleNamespace:
    """What capture_blocker reads of a bfloat16 kernels model on a GPU, split over two ranks (no MoE layers)."""
    return SimpleNamespace(
        device=torch.device("cuda"), dtype=torch.bfloat16, parallel=SimpleNamespace(world_size=2, distributed=True),
        backend=SimpleNamespace(name="kernels", kernel_ops=CAPTURED_OPS), layers=[], mtp=[],
    )  # fmt: skip


def test_parallel_ranks_are_captured_over_nccl_only(monkeypatch):
    model = _cuda_model_over_two_ranks()
    assert "only over NCCL" in capture_blocker(model)  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert "only over NCCL" in capture_blocker(model)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert capture_blocker(model) is None


def test_captured_steps_take_the_fixed_size_expert_exchanges():
    # dsv3.model.parallel sends batches of up to LOW_LATENCY_TOKENS tokens a rank through the low-latency exchanges,
    # whose counts stay on the device; a captured step has at most MASKED_MAX_TOKENS tokens
    assert MASKED_MAX_TOKENS <= LOW_LATENCY_TOKENS


def test_padded_inputs_mark_padding_as_empty_sequences():
    sequences = [
        SimpleNamespace(token_ids=[5, 6, 7], num_computed=2, pages=PageList([4])),
        SimpleNamespace(token_ids=[9] * 70, num_computed=69, pages=PageList([1, 3])),
    ]
    inputs = padded_decode_inputs(sequences, 4)
    assert inputs["ids"].tolist() == [7, 9, 0, 0]
    assert inputs["positions"].tolist() == [2, 69, 0, 0]
    assert inputs["slot_mapping"].tolist() == [4 * 64 + 2, 3 * 64 + 5, -1, -1]  # position 69: page 3, row 5
    assert inputs["seq_lens"].tolist() == [3, 70, 0, 0] and inputs["seq_lens"].dtype == torch.int32
    assert inputs["block_table"].tolist() == [[4, 0], [1, 3]]
    assert GRAPH_BATCH_SIZES[0] == 1 and list(GRAPH_BATCH_SIZES) == sorted(GRAPH_BATCH_SIZES)


def test_padded_verification_inputs_feed_the_last_token_and_the_draft():
    sequences = [
        SimpleNamespace(token_ids=[5, 6, 7], num_computed=2, pages=PageList([4]), draft=8),
        SimpleNamespace(token_ids=[9] * 64, num_computed=63, pages=PageList([1, 3]), draft=2),  # the draft opens page 3
    ]
    inputs = padded_decode_inputs(sequences, 4, fed=2)
    assert inputs["ids"].tolist() == [7, 8, 9, 2] + [0] * 4
    assert inputs["positions"].tolist() == [2, 3, 63, 64] + [0] * 4
    assert inputs["slot_mapping"].tolist() == [4 * 64 + 2, 4 * 64 + 3, 1 * 64 + 63, 3 * 64 + 0] + [-1] * 4
    assert inputs["seq_lens"].tolist() == [4, 65, 0, 0]


@pytest.mark.parametrize("fed", [1, 2])
def test_padding_rows_change_no_real_row_and_write_nothing(tiny, fed, device):
    # fed=2 is an MTP verification step (last token and draft) followed by the MTP module's drafting pass;
    # tests/cuda/test_runtime_cuda.py runs this on the GPU's kernels too
    model = DeepseekV3.from_pretrained(tiny, dtype="bfloat16", device=device.type, backend="kernels")
    prompts, pages = [[0, 11, 12, 13], [0, 21], [0, 31, 32]], [[0], [2], [3]]
    caches = model.allocate_kv_cache(6)
    table = torch.tensor(pages, dtype=torch.int32, device=device)
    prefill = AttentionBatch.build(table, [0, 0, 0], [len(p) for p in prompts])
    last = model.logits(model.forward(torch.tensor([t for p in prompts for t in p]), prefill, caches))
    firsts = last[[3, 5, 8]].argmax(dim=-1).tolist()  # each prompt's next token
    sequences = [
        SimpleNamespace(token_ids=[*p, t], num_computed=len(p), pages=PageList(pg), draft=(t * 7) % 500)
        for p, t, pg in zip(prompts, firsts, pages, strict=True)
    ]
    fed_ids = [t for s in sequences for t in ([s.token_ids[-1]] if fed == 1 else [s.token_ids[-1], s.draft])]
    next_ids = [(t + 3) % 500 for t in fed_ids]
    rows = len(fed_ids)

    unpadded_caches = [c.clone() for c in caches]
    batch = AttentionBatch.build(table, [len(p) for p in prompts], [fed] * len(prompts))
    hidden = model.forward(torch.tensor(fed_ids), batch, unpadded_caches)
    expected = model.logits(hidden)
    expected_mtp = model.mtp_logits(torch.tensor(next_ids), hidden, batch, unpadded_caches) if fed == 2 else None

    size = 8
    inputs = {name: t.to(device) for name, t in padded_decode_inputs(sequences, size, fed).items()}
    padded_table = torch.zeros(size, 1, dtype=torch.int32, device=device)  # padding rows' pages are never read
    padded_table[:3] = inputs["block_table"]
    padded = AttentionBatch(
        query_lens=(fed,) * size, positions=inputs["positions"], slot_mapping=inputs["slot_mapping"],
        block_table=padded_table, seq_lens=inputs["seq_lens"], cached_lens=(0,) * size,
    )  # fmt: skip
    padded_hidden = model.forward(inputs["ids"], padded, caches)
    logits = model.logits(padded_hidden)
    assert logits.shape[0] == size * fed
    # the split-KV partition may differ with the empty sequences added, so the sums may round differently
    assert calc_diff(logits[:rows], expected) < 1e-5
    if fed == 2:
        padded_next = torch.tensor(next_ids + [0] * (size * fed - rows))
        mtp = model.mtp_logits(padded_next, padded_hidden, padded, caches)
        assert calc_diff(mtp[:rows], expected_mtp) < 1e-5
    for layer, (mine, theirs) in enumerate(zip(caches, unpadded_caches, strict=True)):
        assert_bitwise_equal(mine.cpu(), theirs.cpu(), f"cache of layer {layer}")
