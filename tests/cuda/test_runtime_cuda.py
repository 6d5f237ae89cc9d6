"""The runtime on a GPU: LLM.generate with the CUDA kernels, against the same checkpoint run on the CPU."""

from __future__ import annotations

import pytest
import torch

from dsv3.model.batch import AttentionBatch
from dsv3.model.tiny import make_tiny_checkpoint
from dsv3.model.transformer import DeepseekV3
from dsv3.runtime import LLM, SamplingParams
from dsv3.runtime.page_allocator import pages_for
from dsv3.runtime.sampler import batch_probabilities, inverse_cdf_draw, next_tokens
from dsv3.testing import calc_diff
from tests.ep.launcher import run_ranks
from tests.model.helpers import page_table
from tests.runtime.test_decode_graphs import test_padding_rows_change_no_real_row_and_write_nothing  # noqa: F401

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


def _prefill_logits(model: DeepseekV3, device: str) -> torch.Tensor:
    batch = AttentionBatch.build(page_table([[0]]).to(device), [0], [len(PROMPTS[0])])
    return model.logits(model.forward(torch.tensor(PROMPTS[0]), batch, model.allocate_kv_cache(1))).cpu()


def test_bfloat16_kernels_stay_close_to_float32(tiny, device):
    exact = _prefill_logits(DeepseekV3.from_pretrained(tiny, dtype="float32"), "cpu")
    model = DeepseekV3.from_pretrained(tiny, dtype="bfloat16", device="cuda", backend="kernels")
    assert model.backend.name == "kernels"
    # FP8 activations carry ~3% error per GEMM and a random tiny model amplifies it at later positions (routing
    # flips), so the first position is held to a bound, as on the CPU (tests/model/test_model_vs_hf.py)
    assert calc_diff(_prefill_logits(model, "cuda")[0], exact[0]) < 0.02


def test_bfloat16_generate_runs_on_the_gpu(tiny, device):
    llm = LLM(tiny, device="cuda", dtype="bfloat16", speculative="mtp", num_kv_pages=16)
    outputs = llm.generate(PROMPTS, GREEDY)
    vocab = llm.model.config.vocab_size
    assert all(o.num_generated_tokens == 12 and all(0 <= t < vocab for t in o.token_ids) for o in outputs)


def test_cuda_graph_decode_gives_the_eager_tokens(tiny, device):
    eager = LLM(tiny, device="cuda", dtype="bfloat16", num_kv_pages=16)
    graphed = LLM(tiny, device="cuda", dtype="bfloat16", num_kv_pages=16, cuda_graphs=True)
    # four prompts: a captured batch size exactly; the longest crosses a page boundary while decoding
    prompts = [*PROMPTS, [0, *range(100, 160)]]
    expected = [o.token_ids for o in eager.generate(prompts, GREEDY)]
    assert [o.token_ids for o in graphed.generate(prompts, GREEDY)] == expected
    assert sorted(graphed.decode_graphs.graphs) == [(4, 1)]
    # three sequences replay the same graph with one padding row (which changes no real row: the padding test, run
    # here on the GPU's kernels, holds the logits to the unpadded step's)
    outputs = graphed.generate(PROMPTS, GREEDY)
    assert all(o.num_generated_tokens == GREEDY.max_tokens for o in outputs)
    assert sorted(graphed.decode_graphs.graphs) == [(4, 1)]


def test_cuda_graph_mtp_verification_gives_the_eager_tokens_and_acceptance(tiny, device):
    eager = LLM(tiny, device="cuda", dtype="bfloat16", speculative="mtp", num_kv_pages=16)
    graphed = LLM(tiny, device="cuda", dtype="bfloat16", speculative="mtp", num_kv_pages=16, cuda_graphs=True)
    prompts = [*PROMPTS, [0, *range(100, 160)]]  # four: a captured size, so no padding row changes a partition
    expected = eager.generate(prompts, GREEDY)
    outputs = graphed.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    assert [o.mtp_acceptance_rate for o in outputs] == [o.mtp_acceptance_rate for o in expected]
    assert sorted(graphed.decode_graphs.graphs) == [(4, 2)]


def test_cuda_graph_mtp_steps_beyond_the_masked_layout_run_eagerly(tiny, device):
    # 33 sequences x 2 tokens exceed MASKED_MAX_TOKENS: no 64-sequence verification graph is captured
    prompts = [[0, 7 + i] for i in range(33)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    graphed = LLM(tiny, device="cuda", dtype="bfloat16", speculative="mtp", num_kv_pages=40, cuda_graphs=True)
    assert all(o.num_generated_tokens == 3 for o in graphed.generate(prompts, params))
    assert (64, 2) not in graphed.decode_graphs.graphs


def test_cuda_graph_decode_falls_back_to_eager_above_the_largest_size(tiny, device):
    prompts = [[0, 7 + i] for i in range(65)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    graphed = LLM(tiny, device="cuda", dtype="bfloat16", num_kv_pages=80, max_num_seqs=80, cuda_graphs=True)
    outputs = graphed.generate(prompts, params)
    assert all(o.num_generated_tokens == 3 for o in outputs) and graphed.decode_graphs.graphs == {}


def _graphed_tokens_equal_eager(rank: int, world: int, checkpoint: str, tp: int, ep: int, speculative) -> None:
    options = dict(device="cuda", dtype="bfloat16", num_kv_pages=16, speculative=speculative,
                   tensor_parallel_size=tp, expert_parallel_size=ep)  # fmt: skip
    prompts = [*PROMPTS, [0, *range(100, 160)]]  # four: a captured size
    expected = [o.token_ids for o in LLM(checkpoint, **options).generate(prompts, GREEDY)]
    graphed = LLM(checkpoint, cuda_graphs=True, **options)
    assert [o.token_ids for o in graphed.generate(prompts, GREEDY)] == expected
    assert sorted(graphed.decode_graphs.graphs) == [(4, 2 if speculative else 1)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two NCCL ranks need two GPUs")
@pytest.mark.parametrize(("tp", "ep", "speculative"), [(2, 1, None), (1, 2, None), (2, 2, "mtp")])
def test_cuda_graph_decode_under_tensor_and_expert_parallelism(tiny, device, tp, ep, speculative):
    """The all-reduces, all-gathers and low-latency expert exchanges of a decode step are captured with it."""
    run_ranks(2, _graphed_tokens_equal_eager, str(tiny), tp, ep, speculative, backend="nccl", timeout=240)


def test_sampling_on_the_gpu_filters_and_draws_as_on_the_cpu(device):
    torch.manual_seed(0)
    logits = torch.randn(4, 129280) * 3  # DeepSeek-V3's vocabulary
    params = [SamplingParams(temperature=0.7), SamplingParams(top_p=0.9), SamplingParams(top_k=50), GREEDY]
    on_gpu = batch_probabilities(logits.to(device), params[:3]).cpu()
    torch.testing.assert_close(on_gpu, batch_probabilities(logits, params[:3]), atol=1e-7, rtol=1e-4)
    n = 1 << 12
    probs = torch.tensor([0.5, 0.0, 0.25, 0.125, 0.125, 0.0], device=device)
    counts = torch.bincount(inverse_cdf_draw(probs.expand(n, -1), (torch.arange(n, device=device) + 0.5) / n))
    assert counts.tolist() == [n // 2, 0, n // 4, n // 8, n // 8]
    tokens = next_tokens(logits.to(device), params, [torch.Generator().manual_seed(1) for _ in params])
    assert tokens[3] == int(logits[3].argmax()) and all(0 <= t < 129280 for t in tokens)


def test_gpu_defaults_take_large_steps_and_the_cache_that_the_sequences_need(tiny, device):
    llm = LLM(tiny, device="cuda", dtype="bfloat16", max_num_seqs=8)
    assert llm.max_num_batched_tokens == 4096
    assert llm.cache.num_pages == 8 * pages_for(llm.max_model_len)  # far less than 90% of the GPU's memory
