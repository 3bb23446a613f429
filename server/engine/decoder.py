"""The decoder stack of a Llama-family model, run directly on the model's own modules.

transformers' ``LlamaModel.forward`` wraps each step in output capturing, mask building,
keyword plumbing and one ``nn.Module`` call (with its hook checks) per norm, projection and
layer. ``run_decoder`` runs the same stack as a plain loop over the layers, with the same
torch operators in the same order on the same weights, so its result has the same bits as
transformers' (``tests/integration/test_architectures.py`` checks every supported
architecture, in float32 and bfloat16, against the model's own forward). Measured with
``prefix-serve bench profile`` on a 2-core Xeon, the decode steps' work outside the weights
and attention fell from 1.19 to 0.80 s (float32) and from 0.95 to 0.72 s (bfloat16). Where
it does less work than transformers, it does so without changing a value:

- RMSNorm skips the casts to and from float32 when the model is float32 (they would return
  the tensor itself);
- rotary embedding multiplies by a sine whose first half is negated and by the input rolled
  by half a head, which is ``rotate_half(x) * sin`` term by term (a negation is exact);
- the finiteness of a layer's new keys and values is settled by one sum (``attention``);
- where ``cpu_kernels`` packed a layer's q/k/v (or gate/up) weights together, one call of the
  native product gives the group's outputs side by side and the queries' and keys' heads are
  rotated in one call: that product sums each output column on its own, so every
  projection's columns have the bits of its own call;
- in float32 and bfloat16 on the CPU, the rotation and the cache write are single native
  calls with torch's bits, and the norms and the SiLU gate are the native kernels the model's
  own RMSNorm and SiLU modules were routed to (``cpu_layers``), so transformers' forward
  computes the same values;
- products and sums whose operand is a fresh tensor of this step (a projection's output, a
  norm's or rotary's intermediate) are written into it in place (``a * b`` is ``b * a`` and
  ``a + b`` is ``b + a`` to the last bit), so each layer allocates fewer activation-sized
  tensors (W1 end to end on the same Xeon: unchanged within its noise, medians 7.72 against
  7.70 s).

Only layer classes whose forward is known to be this computation are run here
(``DECODER_LAYERS``, with exactly the modules that forward uses, and RMSNorms); any other
model goes through transformers' forward unchanged. The rotary embedding is the model's own
module, called as transformers calls it, so every RoPE scaling type gives what it gives there.
"""

from __future__ import annotations

from typing import Any

import torch

from server.engine import attention, cpu_layers
from server.engine.attention_metadata import AttentionMetadata

# Decoder layers whose forward is: RMSNorm, q/k/v projections, rotary embedding, attention,
# o projection, residual; RMSNorm, gated MLP, residual (transformers 5's Llama, Mistral and
# Qwen2; Qwen2's projection biases live in its ``nn.Linear`` modules).
DECODER_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
_ATTENTION_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_MODULES = {"gate_proj", "up_proj", "down_proj", "act_fn"}
_LAYER_MODULES = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


def supports(model: torch.nn.Module) -> bool:
    """Whether ``run_decoder`` computes ``model``'s decoder stack (else use its forward)."""
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if layers is None or not hasattr(decoder, "rotary_emb") or not _is_rms_norm(norm):
        return False
    for layer in layers:
        if type(layer).__name__ not in DECODER_LAYERS:
            return False
        children = {name for name, _ in layer.named_children()}
        attn = {name for name, _ in layer.self_attn.named_children()}
        mlp = {name for name, _ in layer.mlp.named_children()}
        if children != _LAYER_MODULES or attn != _ATTENTION_MODULES or mlp != _MLP_MODULES:
            return False
        if not (
            _is_rms_norm(layer.input_layernorm) and _is_rms_norm(layer.post_attention_layernorm)
        ):
            return False
    return True


def _is_rms_norm(norm: object) -> bool:
    return type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon")


def _rms_norm(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """transformers' RMSNorm: float32 statistics, the weight applied in the input's dtype; the
    module's own forward where it was routed to the native kernel (``cpu_layers``)."""
    if getattr(norm, "_ps_layer", False):
        out: torch.Tensor = norm.forward(x)
        return out
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    if dtype != torch.float32:
        h = h.to(dtype)
    return h.mul_(norm.weight)  # h is this call's own tensor: multiply in place


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x [T, H, D]``: ``rotate_half(x)`` is ``x``
    rolled by half a head with its first half negated, and the negation is moved onto the sine
    (``signed_sin``), which gives the same products exactly."""
    rotated = cpu_layers.rotate(x, cos, signed_sin)  # the same operators in one native call
    if rotated is not None:
        return rotated
    half = x.shape[-1] // 2
    return torch.mul(x, cos).add_(x.roll(half, dims=-1).mul_(signed_sin))


def run_decoder(
    model: torch.nn.Module,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """The decoder stack over a flat batch: ``embeds [T, hidden]`` at ``positions [T]`` ->
    the final-norm hidden states ``[T, hidden]``, writing each layer's keys and values into
    ``meta``'s cache (as ``attention.paged_attention_forward`` does)."""
    decoder: Any = model.model
    rows = embeds.shape[0]
    cos, sin = decoder.rotary_emb(embeds, positions.unsqueeze(0))  # [1, T, D] each
    cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, D]
    half = sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    x = embeds
    for index, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        h = _rms_norm(x, layer.input_layernorm)
        q, k, v = _project_qkv(attn, h, cos, signed_sin)
        out = attention.write_and_attend(
            meta, index, q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn.scaling
        )  # [Hq, T, D]
        x = attn.o_proj.forward(out.transpose(0, 1).reshape(rows, -1)).add_(x)
        h = _rms_norm(x, layer.post_attention_layernorm)
        x = mlp.down_proj.forward(_gated(mlp, h)).add_(x)
    return _rms_norm(x, decoder.norm)


def _project_qkv(
    attn: Any, h: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and keys (rotated) and values ``[T, heads, D]`` of ``h [T, hidden]``. Where the
    three projections have one joint product (``cpu_kernels.JOINT_PRODUCTS``), one call gives
    them side by side and the queries' and keys' heads are rotated together: the same
    products, element by element, as three calls and two rotations."""
    rows, d = h.shape[0], attn.head_dim
    joint = getattr(attn, "_ps_qkv", None)
    qkv = joint(h) if joint is not None else None
    if qkv is None:
        q = _rotate(attn.q_proj.forward(h).view(rows, -1, d), cos, signed_sin)
        k = _rotate(attn.k_proj.forward(h).view(rows, -1, d), cos, signed_sin)
        return q, k, attn.v_proj.forward(h).view(rows, -1, d)
    q_width, k_width = attn.q_proj.out_features, attn.k_proj.out_features
    qk = _rotate(qkv[:, : q_width + k_width].view(rows, -1, d), cos, signed_sin)
    v = qkv[:, q_width + k_width :].view(rows, -1, d)
    return qk[:, : q_width // d], qk[:, q_width // d :], v


def _gated(mlp: Any, h: torch.Tensor) -> torch.Tensor:
    """The gated MLP's input to its down projection: ``act(gate(h)) * up(h)``, the two
    projections in one call where they have a joint product, and the activation and product
    in one native call where the activation was routed to it (``cpu_layers``: the same SiLU
    values, each times ``up`` with one rounding, as torch's product)."""
    joint = getattr(mlp, "_ps_gate_up", None)
    both = joint(h) if joint is not None else None
    width = mlp.gate_proj.out_features
    if both is None:
        gate, up = mlp.gate_proj.forward(h), mlp.up_proj.forward(h)
    else:
        gate, up = both[:, :width], both[:, width:]
    if getattr(mlp.act_fn, "_ps_layer", False):
        gated = cpu_layers.silu_gate(gate, up)
        if gated is not None:
            return gated
    if both is not None and width % 64:
        # torch's activation kernels take a row's last few values (what is left of whole
        # vectors) one at a time, and rows of the joint output end where a contiguous gate's
        # would not: measured here (torch 2.13, AVX2), SiLU of a 37 x w slice of a wider
        # tensor differed from SiLU of its contiguous copy in 2-21 values at 11 of 12 widths
        # w from 3 to 130, none a multiple of 16.
        gate = gate.contiguous()
    out: torch.Tensor = mlp.act_fn.forward(gate).mul_(up)
    return out
