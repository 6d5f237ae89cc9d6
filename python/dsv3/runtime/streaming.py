"""What `LLM.stream` yields: each request's new tokens and text after a step, with only settled text let out."""

from __future__ import annotations

from dataclasses import dataclass

from dsv3.runtime.sequence import Sequence

REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes a character to while its last bytes are still missing


@dataclass
class StreamOutput:
    """A request's progress since its previous StreamOutput: the tokens generated and the text they settled (text
    is "" without a tokenizer). Joining a request's `text` pieces gives RequestOutput.text; its last piece has
    finish_reason set."""

    index: int  # the prompt's position in the stream() call
    token_ids: list[int]
    text: str
    finish_reason: str | None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class TextStream:
    """Lets out a sequence's text as it grows, holding back what may still change: a character whose bytes have not
    all been generated (it decodes to U+FFFD until they have) and, when the request has stop strings, its last
    (longest stop string - 1) characters, where a stop string may be completing; the final text is cut before the
    stop string, so no piece ever holds text past it. A byte-level tokenizer (DeepSeek-V3's) decodes a prefix of a
    token list to a prefix of the whole list's text, but for such characters, so the pieces add up to the final
    text."""

    def __init__(self, sequence: Sequence):
        self.sequence = sequence
        self.tokens_sent = 0
        self.text_sent = ""
        self.done = False  # the last piece is out
        self.hold = max((len(s) for s in sequence.params.stop), default=1) - 1

    def poll(self) -> StreamOutput | None:
        """The tokens and text new since the last call, or None when nothing changed."""
        sequence = self.sequence
        tokens = sequence.output_ids[self.tokens_sent :]
        if self.done or not tokens:
            return None
        self.tokens_sent += len(tokens)
        text = self._settled_text()
        piece = text[len(self.text_sent) :] if text.startswith(self.text_sent) else ""
        self.text_sent += piece
        self.done = sequence.finish_reason is not None
        return StreamOutput(sequence.index, tokens, piece, sequence.finish_reason)

    def _settled_text(self) -> str:
        sequence = self.sequence
        if sequence.finish_reason is not None:
            return sequence.text
        if sequence.tokenizer is None:
            return ""
        text = sequence.tokenizer.decode(sequence.output_ids).rstrip(REPLACEMENT)
        return text[: max(len(text) - self.hold, 0)]
