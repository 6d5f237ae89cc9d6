"""The model under tensor and expert parallelism on 2 and 4 gloo ranks: the same logits as one process (float32,
within 1e-4), the same greedy tokens, bit-identical results on every rank, and bad layouts refused on every rank."""

from __future__ import annotations

import pytest
import torch

from dsv3.model.convert import convert_to_bf16
from dsv3.model.parallel import ParallelConfigError, check_sizes, shard_weight
from dsv3.model.tiny import make_tiny_checkpoint
from dsv3.reference.gemm import dequant_weight
from dsv3.reference.quant import per_block_quant_fp8
from tests.ep import model_workers
from tests.ep.launcher import run_ranks


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    fp8 = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ep-fp8"))
    return fp8, convert_to_bf16(fp8, tmp_path_factory.mktemp("tiny-ep-bf16"))


@pytest.fixture(scope="module")
def references(checkpoints):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fp8, bf16 = checkpoints
    refs = {(str(fp8), "float32"): model_workers.single_process_reference(fp8)}
    refs[(str(bf16), "float32")] = model_workers.single_process_reference(bf16)
    refs[(str(fp8), "bfloat16")] = model_workers.single_process_reference(fp8, "bfloat16")
    torch.set_num_threads(threads)
    return refs


def test_world_2(checkpoints, references, tmp_path) -> None:
    fp8, bf16 = (str(p) for p in checkpoints)
    combos = [
        (fp8, 2, 1, "float32"),
        (fp8, 1, 2, "float32"),
        (fp8, 2, 2, "float32"),
        (bf16, 2, 2, "float32"),
        (fp8, 1, 2, "bfloat16"),
        (fp8, 2, 2, "bfloat16"),
    ]
    run_ranks(2, model_workers.run_combos, combos, references, timeout=90)


def test_world_4(checkpoints, references) -> None:
    fp8 = str(checkpoints[0])
    combos = [(fp8, 1, 4, "float32"), (fp8, 4, 1, "float32"), (fp8, 2, 4, "float32")]
    run_ranks(4, model_workers.run_combos, combos, references, timeout=120)


def test_bad_layouts_raise_on_every_rank(checkpoints, tmp_path) -> None:
    run_ranks(2, model_workers.bad_layouts, str(checkpoints[0]), str(tmp_path), timeout=60)


def test_layout_rules() -> None:
    check_sizes(2, 4, 4)
    for tp, ep, world in ((1, 1, 2), (2, 2, 4), (3, 1, 2), (1, 3, 6)):
        with pytest.raises(ParallelConfigError, match="world size"):
            check_sizes(tp, ep, world)
    with pytest.raises(ParallelConfigError, match="expert_parallel_size: expected a positive int"):
        check_sizes(1, 0, 1)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("parts", [2, 3, 4])
def test_shard_weight_is_the_slice_of_the_dequantized_weight(dim: int, parts: int) -> None:
    """Tile-aligned slices stay FP8 with their own scale tiles, others are dequantized; either way bit-exact."""
    g = torch.Generator().manual_seed(dim * 10 + parts)
    q, scale = per_block_quant_fp8(torch.randn(768, 384, generator=g) * torch.rand(768, 1, generator=g))
    full = dequant_weight(q, scale)
    size = full.shape[dim] // parts
    for index in range(parts):
        w, s = shard_weight(q, scale, dim, parts, index)
        want = full.narrow(dim, index * size, size)
        aligned = (index * size) % 128 == 0 and ((index + 1) * size) % 128 == 0
        assert (s is not None) == aligned
        got = dequant_weight(w, s) if s is not None else w
        assert torch.equal(got, want)
