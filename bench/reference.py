"""The hand reference: what a prefix adapter means, computed from PEFT's adapter math and the
bare transformers model, without PEFT's ``generate`` glue or any transformers cache object.

Every exactness test compares the engine against this module. It is deliberately the plainest
possible computation:

- an adapter's virtual tokens are what PEFT's own prompt encoder gives for indices 0..P-1
  (its saved table, its projection MLP, its P-tuning encoder, whichever the adapter holds),
  laid out by PEFT's conventions (``Segment``);
- segments are placed one after another at consecutive positions: prefix-tuning KV occupies
  positions without running the model (no RoPE applied to it), soft prompts and text run
  through the model as input embeddings, then the prompt, then one token per greedy step;
- attention is dense causal attention over a per-layer list of keys and values kept here
  (``_KV``), installed through transformers' attention interface for the duration of a call,
  with the softmax in float32 as transformers' eager attention does it.

Nothing here depends on how ``PeftModel.generate`` hands a prefix to transformers, nor on the
``Cache`` classes, both of which have changed under their users several times (PEFT #1962,
#2121, #2662, #2737, #2753). ``bench.peft_reference`` keeps ``PeftModel.generate`` as a second
witness; ``tests/integration/test_reference.py`` shows the two agree at the locked versions.

Greedy steps stop being comparable at the first step whose top-2 logits are closer than
``TIE_MARGIN``: there, summation order decides, so tests compare tokens before it only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

TIE_MARGIN = 1e-3
_ATTENTION = "prefix_serve_reference"
_STATE = "ps_reference"


@dataclass(frozen=True)
class GreedyResult:
    """One prompt's greedy continuation.

    ``tokens[i]`` is the argmax of the step-i logits; ``margins[i]`` is top1 - top2 of those raw
    logits (>= 0). ``logits`` is [len(tokens), vocab] float32 when asked for, else None.
    """

    tokens: list[int]
    margins: list[float]
    logits: torch.Tensor | None = None

    def first_tie(self, threshold: float = TIE_MARGIN) -> int | None:
        """Index of the first step whose margin is below ``threshold``, or None.

        Tokens before this step must match exactly; at and after it they may differ.
        """
        return next((i for i, m in enumerate(self.margins) if m < threshold), None)

    def comparable(self, threshold: float = TIE_MARGIN) -> list[int]:
        """The tokens before the first tie step: what an engine must reproduce exactly."""
        tie = self.first_tie(threshold)
        return self.tokens if tie is None else self.tokens[:tie]


@dataclass(frozen=True, eq=False)
class Segment:
    """A stretch of positions placed before the prompt.

    ``kind`` is ``prefix_tuning`` (``kv`` [L, 2, kv_heads, P, head_dim], post-RoPE keys as the
    model caches them), ``prompt_tuning`` / ``p_tuning`` (``embeddings`` [P, hidden]) or
    ``text`` (``token_ids``).
    """

    kind: str
    kv: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    token_ids: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        if self.kv is not None:
            return self.kv.shape[3]
        if self.embeddings is not None:
            return self.embeddings.shape[0]
        return len(self.token_ids)


def text_segment(token_ids: Sequence[int]) -> Segment:
    return Segment("text", token_ids=tuple(token_ids))


@torch.no_grad()
def peft_segment(peft_model, adapter_name: str = "default") -> Segment:
    """The virtual tokens of one adapter of a ``PeftModel``, as PEFT's ``get_prompt`` makes them.

    A loaded adapter (inference mode) holds its saved table, which is the encoder's output; a
    trainable one runs its prompt encoder (projection MLP, P-tuning encoder) over indices
    0..P-1. Prefix tuning: the output [P, L*2*H*D] viewed as [P, L*2, H, D], layer l's key in
    row-block 2l and its value in 2l+1. Prompt tuning and P-tuning: [P, hidden] soft prompt.
    """
    config = peft_model.peft_config[adapter_name]
    encoder = peft_model.prompt_encoder[adapter_name]
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    n = config.num_virtual_tokens
    if config.inference_mode:
        out = encoder.embedding.weight
    else:
        out = encoder(torch.arange(n, device=encoder.embedding.weight.device).unsqueeze(0))[0]
    out = out.detach()
    if kind != "prefix_tuning":
        return Segment(kind, embeddings=out.clone())
    layers, heads = config.num_layers, config.num_attention_heads
    kv = out.view(n, layers * 2, heads, config.token_dim // heads).permute(1, 2, 0, 3)
    return Segment(kind, kv=kv.reshape(layers, 2, heads, n, -1).clone())


def adapter_segment(base_model, adapter_dir: str | Path) -> Segment:
    """``peft_segment`` of the adapter ``PeftModel.save_pretrained`` wrote into ``adapter_dir``.

    The base model is wrapped in place (prompt-learning adapters add no module to it and
    change no weight); the wrap's one side effect, ``requires_grad=False`` on the base
    parameters, is undone before returning.
    """
    from peft import PeftModel

    from bench.peft_adapters import quiet_peft

    flags = [(p, p.requires_grad) for p in base_model.parameters()]
    try:
        with quiet_peft():
            wrapped = PeftModel.from_pretrained(base_model, str(adapter_dir))
            return peft_segment(wrapped)
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


class _KV:
    """Keys and values per layer, [kv_heads, positions, head_dim], grown as the model runs."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def extend(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None:
            key, value = torch.cat([old_k, key], dim=1), torch.cat([old_v, value], dim=1)
        self.keys[layer], self.values[layer] = key, value
        return key, value


def _dense_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] (post-RoPE) -> [1, T, Hq, D]: the T new
    positions attend to every earlier position and to themselves causally."""
    state: _KV = kwargs[_STATE]
    keys, values = state.extend(module.layer_idx, key[0], value[0])
    q = query[0]
    groups = q.shape[0] // keys.shape[0]
    keys = keys.repeat_interleave(groups, dim=0)  # query head h reads kv head h // groups
    values = values.repeat_interleave(groups, dim=0)
    t, s = q.shape[1], keys.shape[1]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, keys.transpose(1, 2)) * scale  # [Hq, T, S]
    key_index = torch.arange(s, device=q.device)
    sees = key_index[None, :] <= key_index[s - t :, None]  # query i sits at key index s - t + i
    scores = scores.masked_fill(~sees, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(weights, values)  # [Hq, T, D]
    return out.transpose(0, 1).unsqueeze(0), None


@contextmanager
def _reference_attention(model) -> Iterator[None]:
    """Route ``model``'s attention through ``_dense_attention`` for the duration."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_ATTENTION, _dense_attention)
    AttentionMaskInterface.register(_ATTENTION, lambda *args, **kwargs: None)
    before = model.config._attn_implementation
    model.set_attn_implementation(_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def eos_ids(generation_config) -> list[int]:
    """The end-of-sequence ids of a generation config (none, one or several)."""
    eos = generation_config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def greedy(
    model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    segments: Sequence[Segment] = (),
    ignore_eos: bool = True,
    keep_logits: bool = False,
) -> GreedyResult:
    """Greedy continuation of ``prompt_ids`` after ``segments`` (in order) on the bare model.

    ``ignore_eos=True`` follows vLLM's meaning: an EOS may be chosen but does not stop; with
    ``ignore_eos=False`` generation ends at an EOS, which is included.
    """
    param = next(model.parameters())
    embed = model.get_input_embeddings()
    state = _KV(model.config.num_hidden_layers)
    position = 0
    pending: list[torch.Tensor] = []

    def run() -> torch.Tensor:
        """Run the pending embeddings at the next positions; the last one's logits."""
        nonlocal position, pending
        x = torch.cat(pending).unsqueeze(0)
        positions = torch.arange(position, position + x.shape[1], device=param.device)
        out = model(
            inputs_embeds=x,
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            logits_to_keep=1,
            **{_STATE: state},
        )
        position += x.shape[1]
        pending = []
        return out.logits[0, -1].float()

    def ids(tokens: Sequence[int]) -> torch.Tensor:
        return embed(torch.tensor(list(tokens), dtype=torch.long, device=param.device))

    stop = set() if ignore_eos else set(eos_ids(model.generation_config))
    tokens: list[int] = []
    margins: list[float] = []
    rows: list[torch.Tensor] = []
    with _reference_attention(model):
        for seg in segments:
            if seg.kind == "prefix_tuning":
                if pending:
                    run()
                kv = seg.kv.to(device=param.device, dtype=param.dtype)
                for layer in range(kv.shape[0]):
                    state.extend(layer, kv[layer, 0], kv[layer, 1])
                position += seg.length
            elif seg.kind == "text":
                pending.append(ids(seg.token_ids))
            else:
                pending.append(seg.embeddings.to(device=param.device, dtype=param.dtype))
        pending.append(ids(prompt_ids))
        for step in range(max_new_tokens):
            logits = run()
            top = logits.topk(2).values
            margins.append(float(top[0] - top[1]))
            tokens.append(int(logits.argmax()))
            if keep_logits:
                rows.append(logits.cpu())
            if tokens[-1] in stop or step == max_new_tokens - 1:
                break
            pending.append(ids(tokens[-1:]))
    return GreedyResult(tokens, margins, torch.stack(rows) if keep_logits else None)


@torch.no_grad()
def hf_greedy(
    model, prompt_ids: Sequence[int], max_new_tokens: int, keep_logits: bool = False
) -> GreedyResult:
    """Greedy decoding of the bare model by transformers alone: every step runs the whole
    sequence through ``model(input_ids)`` with the model's own attention and masks (no cache,
    no ``generate``). Quadratic; for short checks of ``greedy`` and of models whose attention
    the reference does not model (sliding windows)."""
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    tokens: list[int] = []
    margins: list[float] = []
    rows: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids + tokens], device=device)
        logits = model(input_ids=x, use_cache=False, logits_to_keep=1).logits[0, -1].float()
        top = logits.topk(2).values
        margins.append(float(top[0] - top[1]))
        tokens.append(int(logits.argmax()))
        if keep_logits:
            rows.append(logits.cpu())
    return GreedyResult(tokens, margins, torch.stack(rows) if keep_logits else None)


@torch.no_grad()
def prefix_kv(model, token_ids: Sequence[int]) -> torch.Tensor:
    """The keys and values the model computes for ``token_ids`` at positions 0..n-1, as a
    prefix-tuning segment holds them: [L, 2, kv_heads, n, head_dim]. A prefix-tuning adapter
    with this KV means exactly what the text means."""
    param = next(model.parameters())
    state = _KV(model.config.num_hidden_layers)
    ids = torch.tensor([list(token_ids)], device=param.device)
    with _reference_attention(model):
        model(input_ids=ids, use_cache=False, logits_to_keep=1, **{_STATE: state})
    return torch.stack([torch.stack([k, v]) for k, v in zip(state.keys, state.values, strict=True)])
