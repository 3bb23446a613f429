"""The incremental output text against the tokenizer's whole decode, token by token, with the
default model's tokenizer (byte-level BPE: characters split across tokens, special tokens)."""

from __future__ import annotations

import random

import pytest

from server.engine.detokenizer import IncrementalText

TEXTS = [
    "Plain English, with punctuation: commas, periods . and  double  spaces.\nNew line.",
    "Café, naïve, Ærøskøbing, Zürich — ça va? «Oui».",
    "日本語のテキストと中文字符，以及한국어 문장.",
    "Emoji 🤖🦜🏴‍☠️ and flags 🇫🇷 between words; math ∑∫√ and arrows →⇒.",
    "<|im_start|>assistant\nArr, matey!<|im_end|> after the end",
]


def check(tokenizer, ids: list[int]) -> None:
    """At every step the text is a prefix of the whole decode, short of at most the last
    window; at the end it equals the whole decode."""
    inc = IncrementalText(tokenizer)
    for n in range(1, len(ids) + 1):
        text = inc.update(ids[:n])
        whole = tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert whole.startswith(text), (n, text, whole)
        behind = tokenizer.decode(ids[max(0, n - 8) : n], skip_special_tokens=True)
        assert len(whole) - len(text) <= len(behind), (n, text, whole)
    assert inc.final(ids) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "accents", "cjk", "emoji", "special"])
def test_incremental_text_equals_whole_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    check(tokenizer, ids)
    # Where every character is complete, nothing is held back.
    inc = IncrementalText(tokenizer)
    for n in range(1, len(ids) + 1):
        whole = tokenizer.decode(ids[:n], skip_special_tokens=True)
        text = inc.update(ids[:n])
        if "\ufffd" not in whole:
            assert text == whole


def test_random_token_sequences(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(20):
        check(tokenizer, [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))])


def test_a_shrinking_token_list_is_an_error(tokenizer):
    inc = IncrementalText(tokenizer)
    inc.update([100, 200, 300])
    with pytest.raises(ValueError, match="shrank"):
        inc.update([100])


def test_each_step_decodes_a_short_window(tokenizer):
    """The point of it: per step, a window of a few tokens, not the whole output."""

    class Counting:
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids, skip_special_tokens):
            self.longest = max(self.longest, len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer(" ".join(TEXTS[:4]) * 4, add_special_tokens=False)["input_ids"]
    counting = Counting()
    inc = IncrementalText(counting)
    for n in range(1, len(ids) + 1):
        inc.update(ids[:n])
    assert len(ids) > 300 and counting.longest <= 8
    assert inc.text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "accents", "cjk", "emoji", "special"])
def test_updates_of_several_tokens_give_the_texts_of_single_ones(tokenizer, text):
    """A decode window settles up to eight tokens before its text is read: growing the list
    by several tokens at a time gives, at each update, the text that updating token by token
    gives at the same length (where the whole decode ends on a complete character), always a
    prefix of the whole decode, and the same final text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] * 2
    rng = random.Random(len(ids))
    one = IncrementalText(tokenizer)
    single = [one.update(ids[:n]) for n in range(1, len(ids) + 1)]
    jumps = IncrementalText(tokenizer)
    n = 0
    while n < len(ids):
        n = min(len(ids), n + rng.randrange(1, 9))
        text_n = jumps.update(ids[:n])
        whole = tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert whole.startswith(text_n), (n, text_n, whole)
        if "\ufffd" not in whole:
            assert text_n == single[n - 1] == whole
    assert jumps.final(ids) == one.final(ids) == tokenizer.decode(ids, skip_special_tokens=True)
