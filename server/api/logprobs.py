"""The engine's ``TokenLogprob`` entries in OpenAI's two response shapes.

- ``/v1/completions`` (the legacy shape): ``{"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}``, one entry per token in each list. ``top_logprobs[i]`` maps token text to
  log probability: the k most likely tokens, most likely first, then the chosen token if it is
  not among them (so 0 <= k gives k or k + 1 entries; two tokens with the same text keep the
  more likely). ``text_offset[i]`` is where token i starts in the choice's text, counted as the
  sum of the lengths of the tokens' texts before it (from the echoed prompt's length for
  generated tokens). With ``echo`` the prompt's tokens come first; the first has a null
  logprob and a null top entry.
- ``/v1/chat/completions``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs":
  [{"token", "logprob", "bytes"}, ...k]}], "refusal": null}``. ``bytes`` are the UTF-8 bytes
  of the token's text (a token that holds part of a character reads as U+FFFD).

Token texts are each token decoded alone, special tokens included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.engine.request import TokenLogprob


class TokenTexts:
    """Token id -> its text, decoded once per id (a response repeats ids a lot)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        new = sorted({i for i in ids if i not in self.cache})
        if new:
            texts = self.tokenizer.batch_decode([[i] for i in new], skip_special_tokens=False)
            self.cache.update(zip(new, texts, strict=True))
        return [self.cache[i] for i in ids]


class CompletionLogprobs:
    """The legacy shape, built in parts (a stream sends each part with its text)."""

    def __init__(self, texts: TokenTexts, k: int, offset: int = 0) -> None:
        self.texts = texts
        self.k = k
        self.offset = offset  # where the next token starts in the choice's text

    def part(
        self, entries: Sequence[TokenLogprob | None], tokens: Sequence[int], first_null: bool
    ) -> dict[str, Any]:
        """``entries[i]`` scores ``tokens[i]``; with ``first_null`` the first token has no
        logprob (the first prompt token: nothing before it is scored)."""
        words = self.texts(tokens)
        out: dict[str, list[Any]] = {
            "tokens": words,
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for i, (entry, word) in enumerate(zip(entries, words, strict=True)):
            out["text_offset"].append(self.offset)
            self.offset += len(word)
            if entry is None or (first_null and i == 0):
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(entry.logprob)
            top: dict[str, float] = {}
            ids = [t for t, _ in entry.top[: self.k]]
            for word_, (_, lp) in zip(self.texts(ids), entry.top, strict=False):
                top.setdefault(word_, lp)
            top.setdefault(word, entry.logprob)
            out["top_logprobs"].append(top)
        return out


def merge(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Legacy parts, concatenated list by list."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [x for part in parts for x in part[key]] for key in keys}


def chat_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprob], k: int) -> dict[str, Any]:
    """The chat shape for generated tokens."""
    content = []
    for entry in entries:
        top = entry.top[:k]
        words = texts([entry.token] + [t for t, _ in top])
        content.append(
            {
                "token": words[0],
                "logprob": entry.logprob,
                "bytes": list(words[0].encode()),
                "top_logprobs": [
                    {"token": w, "logprob": lp, "bytes": list(w.encode())}
                    for w, (_, lp) in zip(words[1:], top, strict=True)
                ],
            }
        )
    return {"content": content, "refusal": None}
