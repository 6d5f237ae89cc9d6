"""What `LLM.stream` yields: each request's new tokens and text after a step, with only settled text let out."""

from __future__ import annotations

from dataclasses import dataclass

from dsv3.runtime.sequence import Sequence


@dataclass
class StreamOutput:
    """A request's progress since its previous StreamOutput: the tokens generated and the text they settled (text
    is "" without a tokenizer). Joining a request's `text` pieces gives RequestOutput.text; its last piece has
    finish_reason set."""

    index: int  # the prompt's position in the stream() call
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None  # of token_ids, with SamplingParams.logprobs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class TextStream:
    """Lets out a sequence's text as it grows (Sequence.text: whole characters only, see dsv3.runtime.detokenizer),
    holding back, when the request has stop strings, its last (longest stop string - 1) characters, where a stop string
    may be completing. The final text is cut before the stop string, so no piece holds text past it, and the pieces
    add up to the final text."""

    def __init__(self, sequence: Sequence):
        sequence.follow_text()
        self.sequence = sequence
        self.tokens_sent = 0
        self.text_sent = ""
        self.done = False  # the last piece is out
        self.hold = max(sequence.longest_stop - 1, 0)

    def poll(self) -> StreamOutput | None:
        """The tokens and text new since the last call, or None when nothing changed."""
        sequence = self.sequence
        tokens = sequence.token_ids[sequence.num_prompt_tokens + self.tokens_sent :]
        if self.done or not tokens:
            return None
        first, self.tokens_sent = self.tokens_sent, self.tokens_sent + len(tokens)
        logprobs = None if sequence.logprobs is None else sequence.logprobs[first : self.tokens_sent]
        text = self._settled_text()
        piece = text[len(self.text_sent) :] if text.startswith(self.text_sent) else ""
        self.text_sent += piece
        self.done = sequence.finish_reason is not None
        return StreamOutput(sequence.index, tokens, piece, sequence.finish_reason, logprobs)

    def _settled_text(self) -> str:
        sequence = self.sequence
        if sequence.finish_reason is not None:
            return sequence.text
        return sequence.text[: max(len(sequence.text) - self.hold, 0)]
