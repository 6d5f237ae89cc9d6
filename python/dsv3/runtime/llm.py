"""`LLM`: load a checkpoint once, then generate for batches of prompts (vLLM's offline API)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dsv3.model.config import ModelConfig
from dsv3.model.parallel import Parallel
from dsv3.model.transformer import DeepseekV3
from dsv3.model.weights import load_checkpoint
from dsv3.runtime.decode_graphs import DecodeGraphs
from dsv3.runtime.engine import Engine, EngineStats
from dsv3.runtime.kv_cache import KV_CACHE_DTYPES, PagedKVCache, default_cache_bytes, page_bytes
from dsv3.runtime.page_allocator import pages_for
from dsv3.runtime.sampling_params import SamplingParams
from dsv3.runtime.scheduler import Scheduler
from dsv3.runtime.sequence import Sequence
from dsv3.runtime.streaming import StreamOutput, TextStream
from dsv3.runtime.tokenizer import Tokenizer

SPECULATIVE = (None, "mtp")
DEVICES = ("cpu", "cuda")
# Tokens a step computes at most, by device. On a GPU a prefill chunk reads the weights of nearly every expert (a few
# hundred tokens, top-8 of 256 experts, reach nearly all of them), so a larger chunk spreads that read over more
# tokens: 512 tokens give an expert ~16 rows (memory-bound grouped GEMMs), 4096 tokens ~128. On the CPU a step of
# 4096 tokens would hold the decoding sequences for seconds.
DEFAULT_BATCHED_TOKENS = {"cpu": 512, "cuda": 4096}


@dataclass
class RequestOutput:
    """One prompt's result. time_s runs from the request's arrival to its last token; mtp_acceptance_rate is the
    share of MTP drafts the model kept (None without speculative decoding)."""

    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    time_s: float
    mtp_acceptance_rate: float | None
    logprobs: list[dict[int, float]] | None = None  # with SamplingParams.logprobs: one dict a generated token

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)


class LLM:
    """A DeepSeek-V3 checkpoint ready to generate.

    dtype "bfloat16" keeps FP8 weights FP8 (production numerics), "float32" dequantizes them (exact, for checking).
    kv_cache_dtype "auto" caches in the model's dtype; "bf16" or "fp8" (656-byte rows) choose. speculative="mtp"
    drafts one token per step with the checkpoint's MTP module and verifies it in the same step. backend "kernels"
    uses dsv3.ops where compiled, "reference" the fp32 PyTorch specification. Scheduling: at most max_num_seqs
    sequences run at once and a step computes at most max_num_batched_tokens tokens (default 512 on the CPU, 4096 on a
    GPU; longer prompts are prefilled in chunks); the cache has num_kv_pages pages of 64 tokens (default: what
    kv_cache_bytes holds, at most what max_num_seqs sequences of max_model_len tokens need; kv_cache_bytes defaults to
    256 MiB on the CPU and, on a GPU, to what is left of gpu_memory_utilization of its memory once the model is
    loaded). Under torchrun every rank takes the smallest page count of all ranks.

    prefix_caching (on by default) keeps the cache pages of finished and preempted sequences, registered by their
    tokens, until their room is wanted: a request whose tokens begin with whole cached pages (a chat's earlier turns,
    a shared system prompt) reuses them instead of computing them again (dsv3.runtime.page_allocator).

    cuda_graphs=True replays decode steps of up to 64 sequences (32 with MTP, whose verification and drafting passes
    both run from graphs) from CUDA graphs, captured on first use of each padded batch size
    (dsv3.runtime.decode_graphs): one launch per forward pass instead of one per kernel. It needs device="cuda",
    dtype="bfloat16" and the kernels backend (and NCCL under torchrun), and says which is missing otherwise.

    Under torchrun, tensor_parallel_size splits attention heads and dense MLPs over that many ranks and
    expert_parallel_size the routed experts (see dsv3.model.parallel); each divides the world size and one equals it.
    Every rank runs the same schedule and sampling on identical logits and returns the same outputs. The process
    group is initialized from torchrun's environment when it is not yet (gloo on the CPU, NCCL on CUDA).
    """

    def __init__(
        self,
        model: str | Path,
        device: str = "cpu",
        dtype: str = "bfloat16",
        kv_cache_dtype: str = "auto",
        speculative: str | None = None,
        backend: str = "kernels",
        max_num_seqs: int = 64,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        num_kv_pages: int | None = None,
        kv_cache_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        expert_parallel_size: int = 1,
        cuda_graphs: bool = False,
        prefix_caching: bool = True,
    ):
        started = time.perf_counter()
        if str(device).split(":")[0] not in DEVICES:
            raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
        if speculative not in SPECULATIVE:
            raise ValueError(f"speculative: expected 'mtp' or None, got {speculative!r}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: expected one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        if isinstance(gpu_memory_utilization, bool) or not (
            isinstance(gpu_memory_utilization, (int, float)) and 0 < gpu_memory_utilization <= 1
        ):
            raise ValueError(f"gpu_memory_utilization: expected a number in (0, 1], got {gpu_memory_utilization!r}")
        if kv_cache_bytes is not None and (
            isinstance(kv_cache_bytes, bool) or not isinstance(kv_cache_bytes, int) or kv_cache_bytes < 1
        ):
            raise ValueError(f"kv_cache_bytes: expected a positive int or None, got {kv_cache_bytes!r}")
        for name, flag in (("cuda_graphs", cuda_graphs), ("prefix_caching", prefix_caching)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}: expected True or False, got {flag!r}")
        if max_num_batched_tokens is None:
            max_num_batched_tokens = DEFAULT_BATCHED_TOKENS[str(device).split(":")[0]]
        for name, value, least in (
            ("max_num_seqs", max_num_seqs, 1),
            ("max_num_batched_tokens", max_num_batched_tokens, 2),
        ):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name}: expected an int >= {least}, got {value!r}")
        self.parallel = _parallel_layout(tensor_parallel_size, expert_parallel_size, str(device))
        config = ModelConfig.from_file(Path(model) / "config.json")
        self.parallel.check(config)
        checkpoint = load_checkpoint(model, config, keep=self.parallel.tensor_filter(config))
        if speculative == "mtp" and not checkpoint.has_mtp:
            raise ValueError(f"speculative='mtp': the checkpoint at {model} has no MTP layer")
        self.model = DeepseekV3(checkpoint, dtype, device, backend, self.parallel)
        config = self.model.config
        self.max_model_len = max_model_len or config.max_position_embeddings
        if not 1 <= self.max_model_len <= config.max_position_embeddings:
            raise ValueError(
                f"max_model_len: expected 1 .. {config.max_position_embeddings} (max_position_embeddings), "
                f"got {max_model_len}"
            )
        if num_kv_pages is None:
            wanted = max_num_seqs * pages_for(self.max_model_len)
            if kv_cache_bytes is None:
                kv_cache_bytes = default_cache_bytes(self.model.device, gpu_memory_utilization)
            num_kv_pages = max(min(kv_cache_bytes // page_bytes(self.model, kv_cache_dtype), wanted), 1)
        self.cache = PagedKVCache(self.model, kv_cache_dtype, self.parallel.smallest(num_kv_pages))
        self.speculative = speculative == "mtp"
        self.prefix_caching = prefix_caching
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        max_pages = min(self.cache.num_pages, pages_for(self.max_model_len))
        self.decode_graphs = DecodeGraphs(self.model, self.cache.layers, max_pages) if cuda_graphs else None
        directory = Path(model)
        self.tokenizer = Tokenizer(directory) if (directory / "tokenizer.json").is_file() else None
        self.load_s = time.perf_counter() - started
        self.stats = EngineStats()

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, or a list of token ids), all batched together; results in prompt order.
        Statistics of the run (time per phase, tokens, MTP acceptance) are left in `self.stats`."""
        prompts, sequences = self._requests(prompts, sampling_params)
        for _ in self._steps(sequences):
            pass
        return [_output(s, p) for s, p in zip(sequences, prompts, strict=True)]

    def stream(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> Iterator[StreamOutput]:
        """generate(), yielding each request's new tokens and text after every step that gave it tokens (see
        dsv3.runtime.streaming), so that a reply can be shown while it is written. A request's last StreamOutput has
        its finish_reason set. Leaving the loop early ends the requests and frees their cache pages."""
        _, sequences = self._requests(prompts, sampling_params)  # bad arguments raise here, not at the first step
        streams = [TextStream(s) for s in sequences]

        def outputs() -> Iterator[StreamOutput]:
            for _ in self._steps(sequences):
                yield from filter(None, (stream.poll() for stream in streams))

        return outputs()

    def _requests(self, prompts, sampling_params) -> tuple[list[str | list[int]], list[Sequence]]:
        """The prompts as a list, and a sequence for each, checked against the model and the cache."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts: expected at least one prompt, got an empty list")
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: expected one per prompt ({len(prompts)}), got {len(params)}")
        sequences = [self._sequence(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        self._share_seeds(sequences)
        return prompts, sequences

    def _steps(self, sequences: list[Sequence]) -> Iterator[None]:
        """Runs the engine over the sequences until all are finished, pausing after each step."""
        scheduler = Scheduler(
            self.cache.allocator, self.max_num_seqs, self.max_num_batched_tokens, self.speculative, self.prefix_caching
        )
        engine = Engine(self.model, self.cache, scheduler, self.speculative, self.decode_graphs)
        for sequence in sequences:
            scheduler.add(sequence)
        try:
            while scheduler.has_work():
                engine.step()
                yield
        finally:  # also when the caller stops early or a step raises: the cache outlives this call
            for sequence in sequences:
                self.cache.allocator.release(sequence.pages)
            engine.stats.preemptions = scheduler.num_preemptions
            engine.stats.reused_tokens = scheduler.reused_tokens
            self.stats = engine.stats

    def _share_seeds(self, sequences: list[Sequence]) -> None:
        """Unseeded requests draw from generators seeded by rank 0, so that every rank samples the same tokens."""
        if not self.parallel.distributed or all(s.params.seed is not None for s in sequences):
            return
        seeds = torch.randint(0, 2**62, (len(sequences),), dtype=torch.int64)
        if dist.get_backend() == "nccl":
            seeds = seeds.cuda()
        dist.broadcast(seeds, src=0)
        for sequence, seed in zip(sequences, seeds.tolist(), strict=True):
            if sequence.params.seed is None:
                sequence.generator.manual_seed(seed)

    def _sequence(self, index: int, prompt: str | list[int], params: SamplingParams) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        vocab = self.model.config.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompts: this checkpoint has no tokenizer.json; pass lists of token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise ValueError(f"prompts[{index}]: expected token ids in [0, {vocab})")
        if not ids:
            raise ValueError(f"prompts[{index}]: empty prompt")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need the checkpoint's tokenizer.json")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"logprobs: expected at most the vocabulary's {vocab} tokens, got {params.logprobs}")
        # Speculative steps write one slot past the last token (the draft).
        needed = len(ids) + params.max_tokens + self.speculative
        limit = min(self.max_model_len, self.cache.capacity_tokens)
        if needed > limit:
            raise ValueError(
                f"prompts[{index}]: {len(ids)} prompt tokens + max_tokens={params.max_tokens} exceed the "
                f"{limit} tokens a sequence may hold (max_model_len {self.max_model_len}, KV cache "
                f"{self.cache.capacity_tokens})"
            )
        return Sequence(index, ids, params, self.model.config.eos_token_ids, self.tokenizer)

    def chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Reply to one conversation ([{"role": ..., "content": ...}, ...]) through the checkpoint's chat template."""
        return self.generate([self._chat_prompt(messages)], sampling_params)[0]

    def stream_chat(
        self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None
    ) -> Iterator[StreamOutput]:
        """chat(), yielding the reply's tokens and text as they are generated (see stream())."""
        return self.stream([self._chat_prompt(messages)], sampling_params)

    def _chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("chat: this checkpoint has no tokenizer.json")
        return self.tokenizer.encode_chat(messages)


def _parallel_layout(tensor_parallel_size: int, expert_parallel_size: int, device: str) -> Parallel:
    """The process layout; joins torchrun's process group first when more than one rank is asked for."""
    for name, value in (("tensor_parallel_size", tensor_parallel_size), ("expert_parallel_size", expert_parallel_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if max(tensor_parallel_size, expert_parallel_size) > 1 and not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if dist.is_initialized() and dist.get_world_size() > 1:
        return Parallel(tensor_parallel_size, expert_parallel_size)
    if max(tensor_parallel_size, expert_parallel_size) > 1:
        return Parallel(tensor_parallel_size, expert_parallel_size)  # raises: one process cannot hold the ranks
    return Parallel.single()


def _output(sequence: Sequence, prompt: str | list[int]) -> RequestOutput:
    return RequestOutput(
        index=sequence.index,
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=sequence.token_ids[: sequence.num_prompt_tokens],
        token_ids=sequence.output_ids,
        text=sequence.text,
        finish_reason=sequence.finish_reason,
        time_s=sequence.finish_time - sequence.arrival,
        mtp_acceptance_rate=sequence.accepted / sequence.drafted if sequence.drafted else None,
        logprobs=sequence.logprobs,
    )
