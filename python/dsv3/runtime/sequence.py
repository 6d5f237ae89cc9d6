"""One request while it is generated: its tokens, how many of them the cache holds, its pages, and when it stops."""

from __future__ import annotations

import time

import torch

from dsv3.runtime.detokenizer import IncrementalDetokenizer
from dsv3.runtime.page_allocator import PageList
from dsv3.runtime.sampling_params import SamplingParams
from dsv3.runtime.tokenizer import Tokenizer


class Sequence:
    """token_ids is the prompt then the generated tokens; the cache holds the first num_computed of them. While
    decoding, exactly the last token is not cached yet: the next step feeds it (plus the MTP draft, when speculating).
    """

    def __init__(
        self,
        index: int,
        prompt_ids: list[int],
        params: SamplingParams,
        eos_ids: tuple[int, ...],
        tokenizer: Tokenizer | None,
    ):
        self.index = index
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.tokenizer = tokenizer
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        self.num_computed = 0
        self.pages = PageList()
        self.registered: list[int] = []  # registration ids of its first pages (PageAllocator.register)
        self.draft: int | None = None  # the MTP module's guess of the token after the last one
        self.drafted = self.accepted = 0
        # with params.logprobs: {token: log-probability} of each generated token and the most likely alternatives
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # the output's text while it grows (whole characters), where followed; its final text once finished
        self.text = ""
        self.detokenizer: IncrementalDetokenizer | None = None
        self.longest_stop = max((len(s) for s in params.stop), default=0)
        if params.stop:
            self.follow_text()
        self.finish_reason: str | None = None
        self.arrival = time.perf_counter()
        self.finish_time: float | None = None

    def follow_text(self) -> None:
        """Keep `text` up to date while tokens arrive (stop strings and streams read it), not only at the end."""
        if self.tokenizer is not None and self.detokenizer is None:
            self.detokenizer = IncrementalDetokenizer(self.tokenizer, self.num_prompt_tokens)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def reset_cache_state(self) -> None:
        """After preemption: everything is recomputed from the start (prompt and generated tokens alike)."""
        self.num_computed = 0
        self.draft = None

    def append(self, token: int, logprobs: dict[int, float] | None = None) -> bool:
        """Add a generated token (with its log-probabilities, where the request asks for them); True once the
        sequence is finished (it then takes no more)."""
        self.token_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprobs)
        stop_at = -1
        if self.detokenizer is not None:
            before = len(self.text)
            self.text += self.detokenizer.update(self.token_ids)
            if self.params.stop and len(self.text) > before:
                # a stop string ending in the new text; one ending earlier would have finished the sequence already
                start = max(before - self.longest_stop + 1, 0)
                stop_at = min((i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0), default=-1)
        if token in self.stop_ids:
            self._finish("stop")
        elif stop_at >= 0:
            self._finish("stop", self.text[:stop_at])  # the text ends before the stop string
        elif len(self.output_ids) >= self.params.max_tokens:
            self._finish("length")
        return self.finish_reason is not None

    def _finish(self, reason: str, text: str | None = None) -> None:
        self.finish_reason = reason
        self.finish_time = time.perf_counter()
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(self.output_ids)  # with any character left incomplete
        self.text = text or ""
