"""CUDA-graph decode (dsv3.runtime.decode_graphs) where no GPU is needed: the models it refuses, and the padded batch
it replays — padding rows must leave the real rows' logits and the cache as an unpadded step leaves them. The capture
and replay themselves are tested in tests/cuda/test_runtime_cuda.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dsv3.model.batch import AttentionBatch
from dsv3.model.transformer import DeepseekV3
from dsv3.runtime import LLM
from dsv3.runtime.decode_graphs import GRAPH_BATCH_SIZES, capture_blocker, padded_decode_inputs
from dsv3.testing import assert_bitwise_equal, calc_diff
from tests.model.helpers import prefill_logits


def test_refused_configurations_name_the_argument_and_the_reason(tiny):
    with pytest.raises(ValueError, match="cuda_graphs: the model runs on cpu, CUDA graphs need device='cuda'"):
        LLM(tiny, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs: MTP verification steps are not captured"):
        LLM(tiny, cuda_graphs=True, speculative="mtp")
    with pytest.raises(ValueError, match="cuda_graphs: expected True or False, got 1"):
        LLM(tiny, cuda_graphs=1)
    model = DeepseekV3.from_pretrained(tiny, dtype="float32")
    assert "device='cuda'" in capture_blocker(model)


def test_padded_inputs_mark_padding_as_empty_sequences():
    sequences = [
        SimpleNamespace(token_ids=[5, 6, 7], num_computed=2, pages=[4]),
        SimpleNamespace(token_ids=[9] * 70, num_computed=69, pages=[1, 3]),
    ]
    inputs = padded_decode_inputs(sequences, 4)
    assert inputs["ids"].tolist() == [7, 9, 0, 0]
    assert inputs["positions"].tolist() == [2, 69, 0, 0]
    assert inputs["slot_mapping"].tolist() == [4 * 64 + 2, 3 * 64 + 5, -1, -1]  # position 69: page 3, row 5
    assert inputs["seq_lens"].tolist() == [3, 70, 0, 0] and inputs["seq_lens"].dtype == torch.int32
    assert inputs["block_table"].tolist() == [[4, 0], [1, 3]]
    assert GRAPH_BATCH_SIZES[0] == 1 and list(GRAPH_BATCH_SIZES) == sorted(GRAPH_BATCH_SIZES)


def test_padding_rows_change_no_real_row_and_write_nothing(tiny):
    model = DeepseekV3.from_pretrained(tiny, dtype="bfloat16", backend="kernels")
    prompts, pages = [[0, 11, 12, 13], [0, 21], [0, 31, 32]], [[0], [2], [3]]
    caches = model.allocate_kv_cache(6)
    last = prefill_logits(model, prompts, pages, caches)
    firsts = last[[3, 5, 8]].argmax(dim=-1).tolist()  # each prompt's next token
    sequences = [
        SimpleNamespace(token_ids=[*p, t], num_computed=len(p), pages=pg)
        for p, t, pg in zip(prompts, firsts, pages, strict=True)
    ]
    unpadded_caches = [c.clone() for c in caches]
    batch = AttentionBatch.build(torch.tensor(pages, dtype=torch.int32), [len(p) for p in prompts], [1] * len(prompts))
    expected = model.logits(model.forward(torch.tensor(firsts), batch, unpadded_caches))

    inputs = padded_decode_inputs(sequences, 8)
    table = torch.zeros(8, 1, dtype=torch.int32)  # padding rows' pages are never read
    table[:3] = inputs["block_table"]
    padded = AttentionBatch(
        query_lens=(1,) * 8, positions=inputs["positions"], slot_mapping=inputs["slot_mapping"], block_table=table,
        seq_lens=inputs["seq_lens"], cached_lens=(0,) * 8,
    )  # fmt: skip
    logits = model.logits(model.forward(inputs["ids"], padded, caches))
    assert logits.shape[0] == 8
    assert calc_diff(logits[:3], expected) < 1e-6
    assert logits[:3].argmax(dim=-1).tolist() == expected.argmax(dim=-1).tolist()
    for layer, (mine, theirs) in enumerate(zip(caches, unpadded_caches, strict=True)):
        assert_bitwise_equal(mine, theirs, f"cache of layer {layer}")
