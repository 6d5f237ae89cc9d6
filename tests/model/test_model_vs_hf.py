"""The model against transformers' DeepseekV3ForCausalLM, and against itself under different batching and paging."""

from __future__ import annotations

import random

import pytest
import torch

from dsv3.model.transformer import DeepseekV3
from dsv3.testing import calc_diff
from tests.model.helpers import contiguous_pages, greedy, prefill_logits

PROMPT = [0, 43, 365, 15, 594, 4, 525, 586, 593, 503, 17, 300, 12, 99, 7]


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def test_prompt_logits_match_transformers(model_fp32, hf_model):
    ours = prefill_logits(model_fp32, [PROMPT])
    theirs = hf_logits(hf_model, PROMPT)
    assert theirs.abs().max() > 1  # a test of something: the tiny model's logits are not all near zero
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_greedy_decode_matches_transformers_for_32_steps(model_fp32, hf_model):
    tokens, logits = greedy(model_fp32, PROMPT, 32)
    expected = []
    for _ in range(32):
        expected.append(int(hf_logits(hf_model, PROMPT + expected)[-1].argmax()))
    assert tokens == expected
    assert len(set(tokens)) > 3  # the tiny model does not just repeat one token
    torch.testing.assert_close(logits[-1], hf_logits(hf_model, PROMPT + tokens[:-1])[-1], atol=1e-4, rtol=0)


def test_prefill_then_decode_equals_one_forward(model_fp32):
    tokens, logits = greedy(model_fp32, PROMPT, 8)
    full = prefill_logits(model_fp32, [PROMPT + tokens[:-1]])[len(PROMPT) - 1 :]
    torch.testing.assert_close(logits, full, atol=2e-5, rtol=0)


def test_shuffled_pages_give_identical_results(model_fp32):
    prompt = (PROMPT * 10)[:140]  # three pages
    in_order, _ = greedy(model_fp32, prompt, 4, pages=[0, 1, 2])
    pages = [7, 3, 5]
    caches = model_fp32.allocate_kv_cache(9)
    for cache in caches:
        cache.fill_(float("nan"))  # unused pages must never be read
    scattered = prefill_logits(model_fp32, [prompt], [pages], caches)
    contiguous = prefill_logits(model_fp32, [prompt], [[0, 1, 2]])
    assert torch.equal(scattered, contiguous)
    shuffled, _ = greedy(model_fp32, prompt, 4, pages=pages)
    assert shuffled == in_order


def test_mixed_length_batch_equals_each_sequence_alone(model_fp32):
    rng = random.Random(0)
    prompts = [[0] + [rng.randrange(4, 600) for _ in range(n)] for n in (3, 70, 1, 20)]
    together = prefill_logits(model_fp32, prompts)
    alone = torch.cat([prefill_logits(model_fp32, [p]) for p in prompts])
    torch.testing.assert_close(together, alone, atol=5e-5, rtol=0)  # GEMM blocking varies with T


def test_runs_of_equal_sequences_batched_in_prefill_equal_each_alone(model_fp32):
    """Consecutive sequences with equal lengths share one attention call in prefill, with or without cached context
    (the second forward: 6 new tokens after 10 cached, causal aligned to the last key)."""
    from dsv3.model.batch import AttentionBatch
    from tests.model.helpers import page_table

    rng = random.Random(1)
    prompts = [[0] + [rng.randrange(4, 600) for _ in range(n)] for n in (15, 15, 15, 40, 15, 3, 3)]
    together = prefill_logits(model_fp32, prompts)
    alone = [prefill_logits(model_fp32, [p]) for p in prompts]
    torch.testing.assert_close(together, torch.cat(alone), atol=5e-5, rtol=0)

    pages = contiguous_pages([16, 16, 16])
    caches = model_fp32.allocate_kv_cache(len(pages))
    prefill_logits(model_fp32, [p[:10] for p in prompts[:3]], pages, caches)
    batch = AttentionBatch.build(page_table(pages), [10, 10, 10], [6, 6, 6])
    assert not batch.absorbed
    rest = model_fp32.logits(model_fp32.forward(torch.tensor([t for p in prompts[:3] for t in p[10:]]), batch, caches))
    torch.testing.assert_close(rest, torch.cat([logits[10:] for logits in alone[:3]]), atol=5e-5, rtol=0)


def test_batched_decode_equals_each_sequence_alone(model_fp32):
    from dsv3.model.batch import AttentionBatch
    from tests.model.helpers import page_table

    prompts = [PROMPT[:4], PROMPT, PROMPT[:9]]
    pages = contiguous_pages([len(p) + 1 for p in prompts])
    caches = model_fp32.allocate_kv_cache(len(pages))
    first = prefill_logits(model_fp32, prompts, pages, caches)
    last = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    next_tokens = first[last].argmax(-1)
    batch = AttentionBatch.build(page_table(pages), [len(p) for p in prompts], [1, 1, 1])
    assert batch.absorbed
    decoded = model_fp32.logits(model_fp32.forward(next_tokens, batch, caches))
    for i, prompt in enumerate(prompts):
        alone = prefill_logits(model_fp32, [[*prompt, int(next_tokens[i])]])[-1]
        torch.testing.assert_close(decoded[i], alone, atol=5e-5, rtol=0)


def test_bfloat16_model_on_bf16_weights_stays_close_to_float32(tiny_bf16, model_fp32):
    model = DeepseekV3.from_pretrained(tiny_bf16, dtype="bfloat16")
    assert calc_diff(prefill_logits(model, [PROMPT]), prefill_logits(model_fp32, [PROMPT])) < 1e-3


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_bfloat16_model_on_fp8_weights_stays_close_to_float32(tiny_fp8, model_fp32, backend):
    model = DeepseekV3.from_pretrained(tiny_fp8, dtype="bfloat16", backend=backend)
    assert model.backend.name == backend
    ours, exact = prefill_logits(model, [PROMPT]), prefill_logits(model_fp32, [PROMPT])
    # FP8 activations carry ~3% error per GEMM; a random tiny model amplifies it at later positions (routing flips),
    # so only the first position is held to a bound. A wrong layout or scale gives calc_diff near 1.
    assert calc_diff(ours[0], exact[0]) < 0.02


def test_mtp_module_predicts_from_hidden_state_and_next_token(model_fp32):
    from dsv3.model.batch import AttentionBatch
    from tests.model.helpers import page_table

    caches = model_fp32.allocate_kv_cache(2)
    batch = AttentionBatch.build(page_table([[0]]), [0], [len(PROMPT) - 1])
    hidden = model_fp32.forward(torch.tensor(PROMPT[:-1]), batch, caches)
    mtp = model_fp32.mtp_logits(torch.tensor(PROMPT[1:]), hidden, batch, caches)
    assert mtp.shape == (len(PROMPT) - 1, model_fp32.config.vocab_size) and torch.isfinite(mtp).all()
    # The module sees the token after each position: changing that token changes its prediction.
    shifted = model_fp32.mtp_logits(torch.tensor(PROMPT[1:]).roll(1), hidden, batch, model_fp32.allocate_kv_cache(2))
    assert not torch.allclose(mtp, shifted)
