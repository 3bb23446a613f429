"""Token choice from logits: logit bias and penalties, then greedy, temperature, top-k, top-p,
per-request seeds."""

from __future__ import annotations

import torch

from server.engine.request import RequestError, Sequence

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


def adjust_logits(row: torch.Tensor, seq: Sequence) -> None:
    """Apply ``seq``'s logit adjustments to its ``row`` of logits, in place, in this order:

    - ``logit_bias``: ``row[t] += bias``;
    - ``repetition_penalty`` r (CTRL, as transformers and vLLM apply it), over every token of
      the prompt and the output: a positive logit is divided by r, any other multiplied by r;
    - ``frequency_penalty`` f and ``presence_penalty`` p (OpenAI's), over the output only:
      ``row[t] -= f * count(t) + p * (count(t) > 0)``.
    """
    p = seq.params
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long)
        row.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype))
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*seq.prompt_token_ids, *seq.output_ids}), dtype=torch.long)
        if len(seen):
            old = row[seen]
            penalty = p.repetition_penalty
            row[seen] = torch.where(old > 0, old / penalty, old * penalty)
    if (p.frequency_penalty or p.presence_penalty) and seq.output_ids:
        counts = torch.bincount(
            torch.tensor(seq.output_ids, dtype=torch.long), minlength=row.shape[-1]
        ).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


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


NON_FINITE = (
    "the model's output for this request is not finite (inf or NaN): its adapters or prompt "
    "drive the model's values out of range, so no token can be chosen"
)


def finite_rows(x: torch.Tensor) -> list[bool]:
    """Per row of ``x`` ([N, V]): every value is finite. A row's sum is finite only if all its
    values are (an inf or NaN carries into the sum), so one sum settles most rows; the rows
    whose sum is not finite (a non-finite value, or finite values whose sum overflows) are
    checked value by value."""
    ok = torch.isfinite(x.sum(dim=-1))
    if not bool(ok.all()):
        unsure = (~ok).nonzero().view(-1)
        ok[unsure] = torch.isfinite(x[unsure]).all(dim=-1)
    result: list[bool] = ok.tolist()
    return result


def sample(
    logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]
) -> list[int | RequestError]:
    """One token per row of ``logits`` ([N, vocab]), for ``seqs[i]``; a row that cannot give
    one (non-finite logits, a sampling error) gives a ``RequestError`` for that request only.
    Runs on the CPU, where the per-request generators live (N x vocab floats: small next to a
    forward)."""
    if logits.device.type != "cpu" and all(plain_greedy(seq, eos_ids) for seq in seqs):
        # On the device, read back one id per row (the argmax, or -1 where the row's sum is
        # not finite), not the whole rows; a row marked -1 is settled on the CPU below.
        ok = torch.isfinite(logits.sum(dim=-1))
        picks: list[int] = torch.where(ok, logits.argmax(dim=-1), -1).tolist()
        if min(picks) >= 0:
            return list(picks)
    logits = logits.float().cpu()
    finite = finite_rows(logits)
    tokens: list[int | RequestError] = [
        0 if ok else RequestError("non_finite", NON_FINITE) for ok in finite
    ]
    banned = [_banned_ids(seq, eos_ids) for seq in seqs]
    if any(banned) or any(seq.params.adjusts_logits for seq in seqs):
        logits = logits.clone()  # ours to edit (the runner's are inference tensors)
    for i, seq in enumerate(seqs):
        if banned[i]:
            logits[i, banned[i]] = float("-inf")
        if seq.params.adjusts_logits and finite[i]:
            adjust_logits(logits[i], seq)
    greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0 and finite[i]]
    if greedy:
        picked = logits if len(greedy) == len(logits) else logits[greedy]
        picks = picked.argmax(dim=-1).tolist()
        for i, tok in zip(greedy, picks, strict=True):
            tokens[i] = tok
    for i, seq in enumerate(seqs):
        if seq.params.temperature == 0 or not finite[i]:
            continue
        try:
            tokens[i] = _draw(logits[i], seq)
        except RuntimeError as exc:  # e.g. torch.multinomial refusing a distribution
            tokens[i] = RequestError("sampling", f"sampling failed for this request: {exc}")
    return tokens


def plain_greedy(seq: Sequence, eos_ids: tuple[int, ...]) -> bool:
    """Greedy with nothing banned and no logit adjusted: the argmax of the raw row."""
    return (
        seq.params.temperature == 0
        and not seq.params.adjusts_logits
        and not _banned_ids(seq, eos_ids)
    )


def _draw(row: torch.Tensor, seq: Sequence) -> int:
    p = seq.params
    # Shifted so that the best logit is 0: a tiny temperature then sends the others to -inf
    # rather than the best to +inf (a NaN softmax); and never divided by float32's 0.
    row = (row - row.max()) / max(p.temperature, _TINY)
    probs = torch.softmax(filter_logits(row, p.top_k, p.top_p), dim=-1)
    if seq.generator is None:
        seq.generator = make_generator(p.seed)
    return int(torch.multinomial(probs, 1, generator=seq.generator))
