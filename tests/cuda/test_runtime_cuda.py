"""The runtime on a GPU: LLM.generate with the CUDA kernels, against the same checkpoint run on the CPU."""

from __future__ import annotations

import pytest

from dsv3.model.tiny import make_tiny_checkpoint
from dsv3.runtime import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[0, 43, 365, 15, 594, 4, 525, 586, 593, 503, 17, 300, 12, 99, 7], [0, 8, 77, 901], [0]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-cuda"))


@pytest.fixture(scope="module")
def cpu_tokens(tiny):
    return [o.token_ids for o in LLM(tiny, dtype="float32", num_kv_pages=16).generate(PROMPTS, GREEDY)]


def test_float32_greedy_tokens_equal_the_cpu_run(tiny, cpu_tokens, device):
    outputs = LLM(tiny, device="cuda", dtype="float32", num_kv_pages=16).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == cpu_tokens


def test_greedy_mtp_speculation_changes_no_token(tiny, cpu_tokens, device):
    llm = LLM(tiny, device="cuda", dtype="float32", speculative="mtp", num_kv_pages=16)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == cpu_tokens


def test_bfloat16_kernels_run_every_layer_on_the_gpu(tiny, cpu_tokens, device):
    llm = LLM(tiny, device="cuda", dtype="bfloat16", num_kv_pages=16)
    assert llm.model.backend.name == "kernels"
    outputs = llm.generate(PROMPTS, GREEDY)
    assert all(o.num_generated_tokens == 12 for o in outputs)
    # FP8 activations and a bf16 cache move later logits; the first greedy token of each prompt is held exactly.
    assert [o.token_ids[0] for o in outputs] == [t[0] for t in cpu_tokens]
