"""A sequence's text, extended token by token in time that does not grow with the text: each new token decodes only
the few tokens since the last whole character, not the whole output again (which, for outputs of tens of thousands
of tokens, would cost milliseconds a step)."""

from __future__ import annotations

from dsv3.runtime.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes a character to while its last bytes are still missing


class IncrementalDetokenizer:
    """The text of token_ids[first:], whole characters only. decode(ids[prefix:read]) is the end of `text` (the window's
    context), decode(ids[prefix:]) that plus what the tokens after `read` add; a byte-level tokenizer (DeepSeek-V3's)
    decodes a list to the concatenation of its pieces' texts wherever the pieces split between characters, so `text`
    is always a prefix of decoding the whole list."""

    def __init__(self, tokenizer: Tokenizer, first: int):
        self.tokenizer = tokenizer
        self.text = ""
        self._prefix = self._read = first

    def update(self, token_ids: list[int]) -> str:
        """Extends `text` by what the tokens appended to token_ids since the last call complete; returns that."""
        context = self.tokenizer.decode(token_ids[self._prefix : self._read])
        window = self.tokenizer.decode(token_ids[self._prefix :])
        if window.endswith(REPLACEMENT) or len(window) <= len(context):
            return ""  # a character still waits for its last bytes, or the tokens add no text (special tokens)
        added = window[len(context) :]
        self.text += added
        self._prefix, self._read = self._read, len(token_ids)
        return added
