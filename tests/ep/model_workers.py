"""What each rank runs in tests/ep/test_model_parallel.py (imported by the spawned processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dsv3.model.parallel import Parallel, ParallelConfigError
from dsv3.model.transformer import DeepseekV3
from dsv3.runtime import LLM, SamplingParams
from dsv3.runtime.kv_cache import page_bytes
from dsv3.testing import calc_diff
from tests.model.helpers import greedy, prefill_logits

PROMPTS = [[0, 43, 365, 15, 7, 99, 3], [5, 6], [17]]  # uneven: 10 tokens over 4 ranks gives shares 3, 3, 2, 2
DECODE_PROMPT, DECODE_STEPS = [0, 43, 365], 3
ATOL = 1e-4


def model_outputs(model: DeepseekV3) -> dict[str, torch.Tensor]:
    """Prefill logits of PROMPTS (unabsorbed attention), then greedy decode steps (absorbed attention)."""
    tokens, steps = greedy(model, DECODE_PROMPT, DECODE_STEPS)
    return {"prefill": prefill_logits(model, PROMPTS), "decode": steps, "tokens": torch.tensor(tokens)}


def generate(llm: LLM) -> list[list[int]]:
    greedy_out = llm.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    sampled = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True))
    return [o.token_ids for o in greedy_out], [o.token_ids for o in sampled]


def single_process_reference(checkpoint: Path, dtype: str = "float32") -> dict:
    model = DeepseekV3.from_pretrained(checkpoint, dtype=dtype, backend="kernels")
    out = model_outputs(model)
    if dtype == "float32":
        out["generated"] = generate(LLM(checkpoint, dtype=dtype, num_kv_pages=16))[0]
    return out


def same_on_every_rank(t: torch.Tensor, what: str) -> None:
    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, t.contiguous())
    for r, piece in enumerate(pieces):
        assert torch.equal(piece.view(torch.uint8), t.view(torch.uint8)), f"{what}: rank {r} differs bitwise"


def check_layout(model: DeepseekV3, parallel: Parallel) -> None:
    """This rank holds its heads and its experts only."""
    c = model.config
    assert model.num_local_heads == c.num_attention_heads // parallel.tp
    moe = model.layers[-1].mlp
    held = moe.experts if moe.experts is not None else moe.stacked[0][0]
    assert len(held) == c.n_routed_experts // parallel.ep


def run_combos(rank: int, world: int, combos: list, references: dict) -> None:
    """combos: (checkpoint, tp, ep, dtype) run in turn on the same ranks; references: single-process outputs by
    (checkpoint, dtype)."""
    for checkpoint, tp, ep, dtype in combos:
        what = f"{Path(checkpoint).name} tp={tp} ep={ep} {dtype}"
        parallel = Parallel(tp, ep)
        model = DeepseekV3.from_pretrained(checkpoint, dtype=dtype, backend="kernels", parallel=parallel)
        check_layout(model, parallel)
        got, want = model_outputs(model), references[(str(checkpoint), dtype)]
        for key in ("prefill", "decode"):
            same_on_every_rank(got[key], f"{what} {key} logits")
        if dtype == "float32":
            for key in ("prefill", "decode"):
                torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0, msg=f"{what} {key} logits")
        else:
            # bf16 activations and FP8 GEMMs round differently once sums are split (and tensor-parallel slices that
            # cut FP8 scale tiles run dequantized), and the random tiny model's logits are nearly flat, so greedy
            # paths soon part: the prefill logits must be no further from the exact (float32) model than the
            # single-process bfloat16 model is, and with whole-width GEMMs (tp = 1) close to that model.
            exact = references[(str(checkpoint), "float32")]["prefill"]
            assert calc_diff(got["prefill"], exact) <= 1.5 * calc_diff(want["prefill"], exact), what
            if tp == 1:
                assert calc_diff(got["prefill"], want["prefill"]) < 2e-2, what
        if dtype == "float32":
            assert torch.equal(got["tokens"], want["tokens"]), f"{what}: greedy tokens differ"
            llm = LLM(checkpoint, dtype=dtype, num_kv_pages=16, tensor_parallel_size=tp, expert_parallel_size=ep)
            greedy_ids, sampled_ids = generate(llm)
            assert greedy_ids == want["generated"], f"{what}: greedy tokens {greedy_ids} != {want['generated']}"
            same_on_every_rank(torch.tensor(sampled_ids), f"{what} unseeded samples")
            if tp > 1 and ep > 1:  # MTP drafting through the sharded MTP block: greedy output is plain greedy's
                llm = LLM(
                    checkpoint, dtype=dtype, num_kv_pages=16, speculative="mtp", tensor_parallel_size=tp,
                    expert_parallel_size=ep,
                )  # fmt: skip
                assert generate(llm)[0] == want["generated"], f"{what}: MTP greedy tokens differ"
        del model


def bad_layouts(rank: int, world: int, checkpoint: str, scratch: str) -> None:
    """Every bad layout raises a named error on every rank before any collective, and the group still works."""
    with pytest.raises(ParallelConfigError, match=f"do not fit the world size {world}"):
        Parallel(world + 1, 1)
    with pytest.raises(ValueError, match=f"do not fit the world size {world}"):
        LLM(checkpoint, dtype="float32")  # tp = ep = 1 under a world of several ranks
    with pytest.raises(ValueError, match="tensor_parallel_size: expected a positive int"):
        LLM(checkpoint, tensor_parallel_size=0, expert_parallel_size=world)
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    odd = Path(scratch) / f"rank{rank}"
    for change, match in (
        ({"num_attention_heads": 3, "num_key_value_heads": 3}, "does not divide num_attention_heads=3"),
        ({"n_routed_experts": 9, "n_group": 3}, "does not divide n_routed_experts=9"),
    ):
        odd.mkdir(parents=True, exist_ok=True)
        (odd / "config.json").write_text(json.dumps({**config, **change}))
        tp, ep = (world, 1) if "num_attention_heads" in change else (1, world)
        with pytest.raises(ValueError, match=match):  # checked before any weight is read
            LLM(odd, dtype="float32", tensor_parallel_size=tp, expert_parallel_size=ep)
    dist.barrier()


def cache_sizes_agree(rank: int, world: int, checkpoint: str) -> None:
    """Ranks given different cache sizes all take the smallest, so that they keep running the same schedule."""
    assert LLM(checkpoint, dtype="float32", num_kv_pages=10 + rank, tensor_parallel_size=world).cache.num_pages == 10
    llm = LLM(checkpoint, dtype="float32", kv_cache_bytes=(rank + 1) << 20, tensor_parallel_size=world)
    pages = torch.tensor([llm.cache.num_pages])
    same_on_every_rank(pages, "KV cache pages")
    assert int(pages) == (1 << 20) // page_bytes(llm.model, "auto")


def world_2(rank: int, world: int, combos: list, references: dict, checkpoint: str, scratch: str) -> None:
    run_combos(rank, world, combos, references)
    moe_layer_bitwise(rank, world, checkpoint)
    bad_layouts(rank, world, checkpoint, scratch)
    cache_sizes_agree(rank, world, checkpoint)


def moe_layer_bitwise(rank: int, world: int, checkpoint: str) -> None:
    """A bfloat16 MoE layer with its experts over every rank: decode-sized batches (the low-latency exchanges and the
    masked grouped GEMMs) give exactly the single-process layer's bits; larger ones (normal dispatch, per-rank sums
    rounded to bf16 before they are added) agree within bf16 rounding. Both backends."""
    from dsv3.model.parallel import LOW_LATENCY_TOKENS

    for backend in ("kernels", "reference"):
        single = DeepseekV3.from_pretrained(checkpoint, dtype="bfloat16", backend=backend, parallel=Parallel.single())
        spread = DeepseekV3.from_pretrained(checkpoint, dtype="bfloat16", backend=backend, parallel=Parallel(1, world))
        g = torch.Generator().manual_seed(3)
        for tokens in (1, world + 1, LOW_LATENCY_TOKENS * world, LOW_LATENCY_TOKENS * world + 1):
            x = (torch.randn(tokens, single.config.hidden_size, generator=g) * 0.5).to(torch.bfloat16)
            want = single.layers[-1].mlp(x, single.backend)
            got = spread.layers[-1].mlp(x, spread.backend)
            same_on_every_rank(got, f"{backend} MoE T={tokens}")
            if tokens <= LOW_LATENCY_TOKENS * world:
                assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{backend} MoE T={tokens}: bits"
            else:
                torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)


def world_4(rank: int, world: int, combos: list, references: dict, checkpoint: str) -> None:
    run_combos(rank, world, combos, references)
    moe_layer_bitwise(rank, world, checkpoint)
