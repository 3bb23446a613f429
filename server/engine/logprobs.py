"""Log probabilities of tokens, from the model's raw logits.

What they are: ``log_softmax`` of the logits the model produced, before logit_bias, penalties,
temperature, top-k and top-p (vLLM's "raw" logprobs), so that a score does not depend on how
the request samples. The chosen token's entry is its log probability in that distribution,
whichever way it was chosen.

Prompt log probabilities (echo) need the logits of every prompt position, which a forward
normally throws away (only each sequence's last row is projected to the vocabulary), and which
the prefix cache does not hold at all. A request that asks for them therefore computes its
whole prompt itself (``Sequence.scores_prompt``): it takes nothing from the cache, while the
blocks it computes enter the cache as any request's do, for the requests after it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from server.engine.batch import Chunk
from server.engine.request import Sequence, TokenLogprob


def wants_prompt_logits(chunk: Chunk) -> bool:
    """Whether the model runner keeps the logits of every row of ``chunk``."""
    return chunk.seq.scores_prompt and chunk.start < chunk.seq.num_prompt


def token_logprobs(logits: torch.Tensor, tokens: Seq[int], k: int) -> list[TokenLogprob]:
    """Row ``i`` of ``logits`` ([N, vocab]) scores ``tokens[i]``, with the ``k`` best."""
    if not len(tokens):
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(tokens), dtype=torch.long, device=logp.device)
    chosen = logp.gather(1, index[:, None])[:, 0].tolist()
    if k > 0:
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tops = [
            tuple(zip(i, v, strict=True))
            for i, v in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens, chosen, tops, strict=True)]


def record_prompt(seq: Sequence, positions: Seq[int], logits: torch.Tensor) -> None:
    """Score the prompt tokens that the rows at ``positions`` (with ``logits``) predict: the
    row at position p predicts ``seq.key[p + 1]`` when that is a real token of the prompt (not
    an adapter's virtual token)."""
    key, num_prompt = seq.key, seq.num_prompt
    if seq.prompt_logprobs is None:
        seq.prompt_logprobs = [None] * num_prompt
    rows = [
        i for i, p in enumerate(positions) if p + 1 < num_prompt and isinstance(key[p + 1], int)
    ]
    if rows:
        targets = [t for i in rows if isinstance(t := key[positions[i] + 1], int)]  # all of them
        k = seq.params.prompt_logprobs or 0
        scored = token_logprobs(logits[torch.tensor(rows, device=logits.device)], targets, k)
        for i, entry in zip(rows, scored, strict=True):
            seq.prompt_logprobs[positions[i] + 1] = entry
    if positions and positions[-1] + 1 >= num_prompt:
        seq.prompt_scored = True
