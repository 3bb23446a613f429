"""How long a prompt may be before it is tokenized: the model's context and the most bytes of
text one token can stand for, so that text too long for the context is refused without
spending tokenizer time on it (which would hold a worker, or the GIL, for seconds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from server.api.errors import APIError
from server.served_model import ServedModel

# Normalizers that never make text shorter than 1/factor of its UTF-8 bytes: NFC at most
# composes three Hangul jamo (9 bytes) into one syllable (3 bytes).
_NORMALIZER_SHRINK = MappingProxyType({"Prepend": 1, "ByteLevel": 1, "NFC": 3})
# Pre-tokenizers that keep every character (they split, never drop).
_KEEPING_PRE_TOKENIZERS = frozenset(
    {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split", "Sequence"}
)


@dataclass(frozen=True)
class PromptLimits:
    """What the loaded model bounds a prompt by (``prompt_limits``, once per model).

    ``context`` is the model's ``max_model_len`` (its ``ModelFacts``), in positions.
    ``token_bytes`` is the most UTF-8 bytes of input text one token can stand for, or None when
    the tokenizer gives no such bound (it may drop or shrink text)."""

    context: int
    token_bytes: int | None

    @property
    def text_bytes(self) -> int | None:
        """Prompt text of more UTF-8 bytes than this makes more tokens than the context holds."""
        return None if self.token_bytes is None else self.context * self.token_bytes


def prompt_limits(model: ServedModel) -> PromptLimits:
    """The context from the model's published facts; the bytes a token can stand for from its
    tokenizer (about 0.1 s: call it once per model, off the event loop)."""
    return PromptLimits(model.facts.max_model_len, longest_token_bytes(model.tokenizer))


def longest_token_bytes(tokenizer: Any) -> int | None:
    """The most UTF-8 bytes of input text that one token can stand for: text of more than
    ``n`` times this many bytes makes more than ``n`` tokens. None when no such bound holds
    (the tokenizer may drop or shrink input: whitespace-splitting pre-tokenizers, unknown
    characters fused into one token, stripping or case-folding normalizers) or the tokenizer
    is not a ``tokenizers`` one; then prompts are not capped by their size.

    Each token is measured as decoded alone and as the second of two copies (a decoder may
    strip the first token's leading space), times what the normalizer may shrink text by.
    About 0.1 s for a 49,152-token vocabulary, once per model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    shrink = _shrink(_state(backend.normalizer))
    if shrink is None or not _keeps_every_character(backend):
        return None
    added = backend.get_added_tokens_decoder().values()
    if any(t.lstrip or t.rstrip for t in added):  # such a token also takes the spaces beside it
        return None
    longest = 0
    for i in backend.get_vocab(with_added_tokens=True).values():
        alone = len(backend.decode([i], skip_special_tokens=False).encode("utf-8"))
        twice = len(backend.decode([i, i], skip_special_tokens=False).encode("utf-8"))
        longest = max(longest, alone, twice - alone)
    return longest * shrink


def _state(component: Any) -> dict[str, Any] | None:
    return None if component is None else json.loads(component.__getstate__())


def _shrink(state: dict[str, Any] | None) -> int | None:
    """How many times fewer UTF-8 bytes the normalizer can leave than it was given (1: never
    fewer); None when it can shrink text without bound, or is not known."""
    if state is None:
        return 1
    kind = state.get("type")
    if kind == "Sequence":
        factor = 1
        for child in state.get("normalizers", []):
            child_factor = _shrink(child)
            if child_factor is None:
                return None
            factor *= child_factor
        return factor
    if kind == "Replace":
        pattern, content = state.get("pattern", {}), state.get("content", "")
        literal = pattern.get("String") if isinstance(pattern, dict) else None
        # A literal replaced by something at least as long never shrinks; a regex may.
        ok = isinstance(literal, str) and len(content.encode()) >= len(literal.encode())
        return 1 if ok and literal else None
    return _NORMALIZER_SHRINK.get(kind) if isinstance(kind, str) else None


def _keeps_every_character(backend: Any) -> bool:
    """Whether every input character reaches some token: no pre-tokenizer drops any, and the
    model has a token for each (byte-level BPE, byte fallback, or one unknown token per
    unknown character)."""
    pre = _state(backend.pre_tokenizer)
    kinds: list[str | None] = []
    stack = [pre] if pre is not None else []
    while stack:
        node = stack.pop()
        kinds.append(node.get("type"))
        if node.get("behavior") == "Removed":
            return False
        stack.extend(node.get("pretokenizers", []))
    if not set(kinds) <= _KEEPING_PRE_TOKENIZERS:
        return False
    model = backend.model
    if type(model).__name__ == "BPE":
        if "ByteLevel" in kinds or model.byte_fallback:
            return True
        return model.unk_token is not None and not model.fuse_unk
    if type(model).__name__ == "Unigram":
        state = _state(model)  # not None: the model is one
        return state is not None and bool(state.get("byte_fallback"))
    return False


def check_text_bytes(texts: list[str], limits: PromptLimits, param: str) -> None:
    """400 without tokenizing when the texts (all of one request's, together) hold more UTF-8
    bytes than the context can: a token stands for at most ``limits.token_bytes`` bytes, so
    more than ``limits.text_bytes`` bytes make more than ``limits.context`` tokens. Counting
    one request's texts together bounds the tokenizer time one request can take."""
    cap = limits.text_bytes
    if cap is None:
        return
    size = sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts)
    if size <= cap:
        return
    fits = (
        f"can fit the context of {limits.context} tokens (at most {limits.token_bytes} bytes "
        "a token)"
    )
    if param == "messages":
        message = f"the messages are {size} bytes of text; at most {cap} bytes {fits}"
    elif len(texts) == 1:
        message = f"the prompt is {size} bytes of text; at most {cap} bytes {fits}"
    else:  # each prompt has a context of its own, but one request is tokenized as a whole
        message = (
            f"the prompts are {size} bytes of text in all; one request may hold at most "
            f"{cap} bytes, what one prompt {fits}"
        )
    raise APIError(400, message, code="invalid_request", param=param)
