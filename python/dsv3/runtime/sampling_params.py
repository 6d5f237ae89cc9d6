"""What a request asks of generation: how to pick tokens and when to stop (vLLM's SamplingParams semantics)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """temperature 0 is greedy; top_k 0 or -1 and top_p 1 disable those filters. Generation stops after max_tokens
    tokens, at an end-of-sequence token (unless ignore_eos), at a token of stop_token_ids, or once the text contains a
    string of `stop` (the text is cut before it). seed makes sampling reproducible, whatever else runs in the batch.
    logprobs=k returns, for every generated token, its log-probability and those of the k most likely tokens under
    the model's distribution (the log-softmax of its logits, before temperature and filters)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    ignore_eos: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature: expected a finite number >= 0, got {self.temperature!r}",
        )
        _check(
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
            f"top_p: expected a number in (0, 1], got {self.top_p!r}",
        )
        _check(_is_int(self.top_k) and self.top_k >= -1, f"top_k: expected -1, 0 (off) or k >= 1, got {self.top_k!r}")
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            f"max_tokens: expected an int >= 1, got {self.max_tokens!r}",
        )
        _check(self.seed is None or _is_int(self.seed), f"seed: expected an int or None, got {self.seed!r}")
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            f"stop: expected non-empty strings, got {self.stop!r}",
        )
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
            f"logprobs: expected None or an int >= 0, got {self.logprobs!r}",
        )
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            f"stop_token_ids: expected token ids >= 0, got {self.stop_token_ids!r}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
