"""`dsv3 generate`, `dsv3 chat` (stdin not a TTY) and `dsv3 demo`, run as a user runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from dsv3.runtime import LLM, SamplingParams


def dsv3(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # the installed dsv3, as a user runs it
    return subprocess.run(
        [sys.executable, "-m", "dsv3", *args], input=stdin, capture_output=True, text=True, env=environment, timeout=120
    )


STATS = re.compile(r"load [\d.]+ s \| prefill \d+ tokens in [\d.]+ s \(\d+ tok/s\) \| decode \d+ tokens in [\d.]+ s")


def test_generate_prints_each_completion_and_the_timings(tiny):
    run = dsv3("generate", str(tiny), "--prompt", "Hello", "--prompt", "The days", "--max-tokens", "5",
               "--speculative", "mtp", "--kv-cache-dtype", "fp8", "--temperature", "0.7", "--seed", "1")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "--- prompt 0: 'Hello'" in run.stdout and "--- prompt 1: 'The days'" in run.stdout
    assert run.stdout.count("(5 tokens, length)") == 2
    assert STATS.search(run.stdout) and "MTP acceptance" in run.stdout


def test_generate_prints_a_single_completion_as_it_is_generated(tiny):
    run = dsv3("generate", str(tiny), "--prompt", "Hello", "--max-tokens", "5", "--temperature", "0")
    assert run.returncode == 0, run.stderr
    expected = LLM(tiny, num_kv_pages=4).generate("Hello", SamplingParams(max_tokens=5, temperature=0))[0]
    assert f"--- prompt 0: 'Hello'\n{expected.text}\n(5 tokens, length)\n" in run.stdout and STATS.search(run.stdout)


def test_chat_reads_turns_from_piped_stdin(tiny):
    run = dsv3("chat", str(tiny), "--max-tokens", "4", stdin="Hi there\n\nHow are you?\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("assistant:") == 2 and STATS.search(run.stdout)


def test_demo_makes_the_checkpoint_then_checks_and_generates(tmp_path):
    run = dsv3("demo", "--max-tokens", "4", env={"DSV3_CACHE_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "tiny" / "config.json").is_file() and "writing the tiny checkpoint" in run.stdout
    assert "self-check: all kernels match the reference" in run.stdout
    assert run.stdout.count(" -> ") == 3 and STATS.search(run.stdout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "float16"], "invalid choice: 'float16'"),
        (["--max-tokens", "-3"], "max_tokens: expected an int >= 1"),
        (["--cuda-graphs"], "cuda_graphs: the model runs on cpu, CUDA graphs need device='cuda'"),
        (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization: expected a number in (0, 1], got 1.5"),
        (["--kv-cache-gib", "0.0001", "--max-model-len", "100000"], "max_model_len: expected 1 .."),
    ],
)
def test_generate_rejects_bad_arguments(tiny, args, message):
    run = dsv3("generate", str(tiny), "--prompt", "Hi", *args)
    assert run.returncode != 0 and message in run.stderr
