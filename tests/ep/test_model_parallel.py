"""The model under tensor and expert parallelism on 2 and 4 gloo ranks: the same logits as one process (float32,
within 1e-4), the same greedy tokens, bit-identical results on every rank, and bad layouts refused on every rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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


def test_world_2_and_bad_layouts(checkpoints, references, tmp_path) -> None:
    """The three layouts of two ranks, both checkpoint formats, then bad layouts raising on every rank (one spawn)."""
    fp8, bf16 = (str(p) for p in checkpoints)
    combos = [
        (fp8, 2, 1, "float32"),
        (fp8, 1, 2, "float32"),
        (fp8, 2, 2, "float32"),
        (bf16, 2, 2, "float32"),
        (fp8, 1, 2, "bfloat16"),
        (fp8, 2, 2, "bfloat16"),
    ]
    run_ranks(2, model_workers.world_2, combos, references, fp8, str(tmp_path), timeout=90)


def test_world_4(checkpoints, references) -> None:
    fp8 = str(checkpoints[0])
    # tp 2 with ep 4: two TP subgroups; tp 4 with ep 2: two EP subgroups, each dispatching among its own ranks.
    combos = [(fp8, 1, 4, "float32"), (fp8, 4, 1, "float32"), (fp8, 2, 4, "float32"), (fp8, 4, 2, "float32")]
    run_ranks(4, model_workers.world_4, combos, references, fp8, timeout=120)


def _cli(command: list[str], stdin: str | None = None, ranks: int = 1) -> str:
    """stdout of `python -m dsv3 ...`, in one process or under torchrun with `ranks` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    # Its own session, so that a hang kills the workers too, not only torchrun.
    proc = subprocess.Popen(
        [*launcher, "-m", "dsv3", *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(stdin or "", timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{command[0]} did not finish within 60 s\n{stderr}")
    assert proc.returncode == 0, stderr
    return stdout


def _without_timings(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if not line.startswith("load ")]


def test_generate_command_under_torchrun(checkpoints) -> None:
    """`torchrun --nproc-per-node 2 -m dsv3 generate --tp 2 --ep 2` prints once what one process prints."""
    args = [str(checkpoints[0]), "--prompt", "Hello", "--prompt", "The days", "--max-tokens", "4", "--dtype", "float32"]
    args += ["--temperature", "0"]
    single = _cli(["generate", *args])
    parallel = _cli(["generate", *args, "--tp", "2", "--ep", "2"], ranks=2)
    assert _without_timings(parallel) == _without_timings(single)
    assert parallel.count("--- prompt 0") == 1


def test_chat_command_under_torchrun(checkpoints) -> None:
    """`dsv3 chat --tp 2 --ep 2` under torchrun: rank 0 reads the turns, every rank runs them, one reply per turn."""
    args = [str(checkpoints[0]), "--max-tokens", "4", "--dtype", "float32", "--ignore-eos"]
    turns = "Hello\n\nThe days\n"
    single = _cli(["chat", *args], stdin=turns)
    parallel = _cli(["chat", *args, "--tp", "2", "--ep", "2"], stdin=turns, ranks=2)
    assert _without_timings(parallel) == _without_timings(single)
    assert sum(line.startswith("assistant: ") for line in parallel.splitlines()) == 2


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
