"""The second witness: greedy generation through ``PeftModel.generate`` (and HF ``generate`` for
the bare model), as a user of PEFT alone would run it.

The engine is compared against the hand reference (``bench.reference``), never against this:
PEFT's glue between its adapters and transformers' ``generate`` has broken several times
(with transformers 5.24 it drops the prefix KV). ``tests/integration/test_reference.py`` shows
that this witness agrees with the hand reference at the locked versions; the W1 baselines
(``bench.baselines``) run the same ``generate`` and ``bench w1`` checks their tokens too.

``ignore_eos=True`` follows vLLM's meaning: an EOS token does not end generation, but it may
still be chosen (it is not masked), so the logits and margins are the model's raw ones.

The base model is wrapped in place by ``PeftModel.from_pretrained`` (no copy): prompt-learning
adapters add no modules and change no weights; the wrap's only side effect, ``requires_grad=False``
on the base parameters, is undone before returning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from bench.peft_adapters import quiet_peft
from bench.reference import GreedyResult, eos_ids


def peft_greedy(
    base_model: PreTrainedModel,
    adapter_dir: str | Path,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    ignore_eos: bool = True,
    batch_size: int = 1,
    keep_logits: bool = False,
) -> list[GreedyResult]:
    """Greedy ``PeftModel.generate`` of each prompt with the adapter in ``adapter_dir``.

    Prompts run one at a time by default; ``batch_size > 1`` left-pads groups of prompts
    (PEFT's batched path: for prefix tuning positions stay those of the unpadded prompt; for
    prompt/P-tuning PEFT ignores position ids, so padding shifts positions). Returns only the
    new tokens. With ``ignore_eos=False`` a sequence ends at its EOS, which is included.
    """
    with _peft(base_model, adapter_dir) as model:
        return _greedy(model, prompt_ids, max_new_tokens, ignore_eos, batch_size, keep_logits)


@contextmanager
def _peft(base_model: PreTrainedModel, adapter_dir: str | Path) -> Iterator[PeftModel]:
    flags = [(p, p.requires_grad) for p in base_model.parameters()]
    try:
        with quiet_peft():
            model = PeftModel.from_pretrained(base_model, str(adapter_dir))
            model.eval()
            yield model
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _greedy(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    ignore_eos: bool,
    batch_size: int,
    keep_logits: bool,
) -> list[GreedyResult]:
    results: list[GreedyResult] = []
    for start in range(0, len(prompt_ids), batch_size):
        group = prompt_ids[start : start + batch_size]
        results.extend(_generate(model, group, max_new_tokens, ignore_eos, keep_logits))
    return results


@torch.no_grad()
def _generate(
    model: torch.nn.Module,
    group: Sequence[Sequence[int]],
    max_new_tokens: int,
    ignore_eos: bool,
    keep_logits: bool,
) -> list[GreedyResult]:
    pad_id = _pad_id(model)
    input_ids, attention_mask = left_pad(group, pad_id=pad_id)
    kwargs = {"eos_token_id": None} if ignore_eos else {}
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    logits = torch.stack(out.logits, dim=1).float()  # [batch, steps, vocab], raw
    new = out.sequences[:, input_ids.shape[1] :]
    top2 = logits.topk(2, dim=-1).values
    margins = top2[..., 0] - top2[..., 1]
    eos = set(eos_ids(_generation_config(model)))
    results = []
    for row in range(len(group)):
        tokens = new[row].tolist()
        if not ignore_eos:
            end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
            tokens = tokens[:end]
        n = len(tokens)
        results.append(
            GreedyResult(
                tokens=tokens,
                margins=margins[row, :n].tolist(),
                logits=logits[row, :n].clone() if keep_logits else None,
            )
        )
    return results


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``prompts`` into (input_ids, attention_mask), both [batch, longest] int64."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
            mask[row, width - len(prompt) :] = 1
    return ids, mask


def _generation_config(model: torch.nn.Module):
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return inner.generation_config


def _pad_id(model: torch.nn.Module) -> int:
    pad = _generation_config(model).pad_token_id
    if pad is not None:
        return pad
    eos = eos_ids(_generation_config(model))
    return eos[0] if eos else 0
