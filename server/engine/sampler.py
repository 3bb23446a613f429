"""Token choice from logits: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from server.engine.request import Sequence

_TINY = torch.finfo(torch.float32).tiny


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _banned_ids(seq: Sequence, eos_ids: tuple[int, ...]) -> list[int]:
    """Tokens that may not be chosen yet: stop tokens before ``min_tokens`` are out."""
    if len(seq.output_ids) >= seq.params.min_tokens:
        return []
    return list(eos_ids) + list(seq.params.stop_token_ids)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k tokens and the smallest set whose probability reaches top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[..., 0] = False  # explicitly: a top_p below float32's range compares as 0
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> list[int]:
    """One token per row of ``logits`` ([N, vocab]), for ``seqs[i]``. Runs on the CPU, where
    the per-request generators live (N x vocab floats: small next to a forward)."""
    logits = logits.float().cpu().clone()  # ours to edit (the runner's are inference tensors)
    greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
    tokens = [0] * len(seqs)
    for i, seq in enumerate(seqs):
        banned = _banned_ids(seq, eos_ids)
        if banned:
            logits[i, banned] = float("-inf")
    if greedy:
        picks = logits[greedy].argmax(dim=-1).tolist()
        for i, tok in zip(greedy, picks, strict=True):
            tokens[i] = tok
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.temperature == 0:
            continue
        # Shifted so that the best logit is 0: a tiny temperature then sends the others to
        # -inf rather than the best to +inf (a NaN softmax); and never divided by float32's 0.
        row = (logits[i] - logits[i].max()) / max(p.temperature, _TINY)
        row = filter_logits(row, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        if seq.generator is None:
            seq.generator = make_generator(p.seed)
        tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return tokens
