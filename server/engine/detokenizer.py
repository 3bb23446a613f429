"""Output text that grows with the tokens, decoding a few tokens per step instead of all.

Decoding every output from its first token at every step costs O(length) per step, so
O(length^2) per request. Instead the text is extended by the difference between two decodes
of a short window: ``ids[start:]`` and ``ids[start:read]``, where ``read`` is where the text
ends and ``start`` the previous step's ``read`` (one token or more of left context, so that a
tokenizer joining tokens, e.g. dropping a leading word-boundary space, decodes the window as it
would the whole). While the window ends in an incomplete UTF-8 character (U+FFFD) the text
waits for the next token. Where the window's decode does not extend its context's (a clean-up
rule reaching further back than the window), the text falls back to one full decode.
"""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    """What the engine uses of a transformers tokenizer."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str | list[str]:
        """The text of ``token_ids`` (a list of lists decodes to a list of texts)."""
        ...


class IncrementalText:
    """The decoded text (special tokens skipped) of a token list that only grows (``update``
    with the whole list)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.text = ""
        self._start = 0  # window start (context already in ``text``)
        self._read = 0  # tokens whose text is in ``text``
        self.rewrites = 0  # times ``text`` was replaced rather than extended

    def _decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one list of ids decodes to one text
        return text

    def update(self, ids: list[int]) -> str:
        if len(ids) < self._read:
            raise ValueError("the token list shrank")
        if len(ids) == self._read:
            return self.text
        context = self._decode(ids[self._start : self._read])
        window = self._decode(ids[self._start :])
        if window.endswith("\ufffd"):
            return self.text  # an incomplete character: wait for its next bytes
        if window.startswith(context):
            self.text += window[len(context) :]
        else:
            self.text = self._decode(ids)
            self.rewrites += 1
        self._start, self._read = self._read, len(ids)
        return self.text

    def final(self, ids: list[int]) -> str:
        """The text of the finished ``ids``: what is held back (an incomplete character at
        the end) is decoded as the whole decode would, with U+FFFD."""
        self.update(ids)
        if self._read < len(ids):
            full = self._decode(ids)
            if not full.startswith(self.text):
                self.rewrites += 1
            self.text = full
            self._start = self._read = len(ids)
        return self.text
