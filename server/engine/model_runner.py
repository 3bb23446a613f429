"""The only module that runs the model: a step's ``BatchPlan`` in, logits out.

The base model's layers come from transformers. For Llama-family layers the stack is run as a
plain loop over the model's modules (``server.engine.decoder``, same bits as transformers'
forward, less Python); any other model runs transformers' forward, with attention routed to
``server.engine.attention`` through transformers' attention interface. Either way attention
reads and writes the paged KV cache owned here. Prefix-tuning virtual tokens never pass
through the model: their K/V is copied into the cache. Prompt/P-tuning virtual tokens enter as
input embeddings.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple, Protocol, cast

import numpy as np
import torch

from adapters_store.tiers import LRUTier
from server.engine import attention, decoder, native, triton_attention
from server.engine.attention_metadata import BACKENDS, build_metadata
from server.engine.batch import BatchPlan
from server.engine.cpu_kernels import route_linears
from server.engine.cpu_layers import route_layers
from server.engine.cuda_decode import CudaDecoder, PendingWindow, Window
from server.engine.decoder import run_decoder
from server.engine.flat import FlatBatch, flatten
from server.engine.logprobs import wants_prompt_logits
from server.engine.request import AdapterSegment

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


class NonFiniteAdapter(ValueError):
    """An adapter's tensor is not finite at the runner's dtype (e.g. float32 values beyond
    bfloat16's range): it must never reach the KV cache, where other requests read beside it."""


class StepResult(NamedTuple):
    """What one forward gives back: float32 logits ``[n_sample, vocab]`` of the chunks whose
    ``sample`` is set, in the order given, and per chunk whether every key and value it wrote
    was finite (a chunk that was not is to be failed: its cache rows hold zeros).
    ``prompt_logits``: for each chunk whose sequence scores its prompt (echo), by chunk index,
    the float32 logits of every one of its rows ``[rows, vocab]``."""

    logits: torch.Tensor
    finite: list[bool]
    prompt_logits: dict[int, torch.Tensor] = {}  # noqa: RUF012 (never mutated)


class DecoderConfig(Protocol):
    """The fields of a transformers decoder's config (``model.config``) the engine reads."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    num_key_value_heads: int
    vocab_size: int


def decoder_config(model: PreTrainedModel) -> DecoderConfig:
    """``model.config`` with the fields the engine reads typed (transformers leaves a config's
    model-specific fields untyped)."""
    return cast(DecoderConfig, model.config)


def head_dim_of(config: DecoderConfig) -> int:
    """The model's head dimension: its ``head_dim`` where it sets one, else hidden / heads."""
    head_dim: int = (
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    return head_dim


def kv_bytes_per_token(config: DecoderConfig, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim_of(config) * elem


class ModelRunner:
    """Owns the model and the KV cache tensor ``[L, 2, Hkv, num_blocks * block_size, D]``."""

    def __init__(
        self,
        model: PreTrainedModel,
        num_blocks: int,
        block_size: int,
        adapter_cache_bytes: int | None = None,
        attention_backend: str = "auto",
        linear_backend: str = "auto",
        direct_decoder: bool = True,
    ) -> None:
        self.attention_backend = _attention_backend(model, attention_backend)
        self.routed_linears = route_linears(model, linear_backend)
        # RMSNorm and SiLU to the native kernels too, unless every route is off.
        self.routed_layers = route_layers(model) if linear_backend != "torch" else 0
        # The decoder stack as a plain loop over the model's modules (same bits, less Python);
        # transformers' forward for any other architecture, or when asked.
        self.direct_decoder = direct_decoder and decoder.supports(model)
        attention.register()
        model.set_attn_implementation(attention.ATTENTION_NAME)
        cfg = decoder_config(model)
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        head_dim = head_dim_of(cfg)
        # One more block than the pool hands out: the scratch block that the padding rows of a
        # captured decode batch write and read (``cuda_decode.py``).
        scratch = 1
        self.kv_cache = torch.zeros(
            cfg.num_hidden_layers,
            2,
            cfg.num_key_value_heads,
            (num_blocks + scratch) * block_size,
            head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        # Decode steps on CUDA: the paged Triton kernel, under CUDA graphs (``enable_cuda_decode``).
        self.cuda_decoder: CudaDecoder | None = None
        self.embed = model.get_input_embeddings()
        # The device tier: adapter KV / embeddings on the device, LRU by bytes (None: unbounded).
        self.adapter_tier: LRUTier[str, torch.Tensor] = LRUTier(
            "device",
            capacity_bytes=adapter_cache_bytes,
            size_of=lambda t: t.numel() * t.element_size(),
        )

    def enable_cuda_decode(self, max_seqs: int, use_graphs: bool = True, window: int = 8) -> str:
        """Run decode steps through ``CudaDecoder`` (CUDA and Triton needed); returns why not,
        or an empty string when enabled."""
        if self.device.type != "cuda":
            return "decode graphs run on CUDA only"
        why = triton_attention.available()
        if why:
            return why
        self.cuda_decoder = CudaDecoder(
            self.model,
            self.kv_cache,
            self.block_size,
            self.num_blocks,
            max_seqs,
            use_graphs=use_graphs,
            window=window,
        )
        return ""

    # Adapters on the device ---------------------------------------------------------------
    def adapter_tensor(self, seg: AdapterSegment) -> torch.Tensor:
        """The segment's KV or embeddings on the runner's device and dtype, through the device
        tier (keyed by content hash, so a new adapter version never finds a stale copy)."""

        def load() -> torch.Tensor:
            src = seg.kv if seg.kind == "prefix_tuning" else seg.embeddings
            assert src is not None, f"adapter {seg.key} of kind {seg.kind} has no tensor"
            tensor = src.to(device=self.device, dtype=self.dtype)
            if not bool(torch.isfinite(tensor).all()):
                raise NonFiniteAdapter(
                    f"adapter {seg.key[:16]} holds values that are not finite in {self.dtype} "
                    "(inf or NaN, or beyond the range of the served dtype)"
                )
            return tensor

        return self.adapter_tier.get_or_load(seg.key, load)

    def drop_adapter(self, key: str) -> None:
        self.adapter_tier.evict(key)

    # One step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def launch_window(
        self,
        plan: BatchPlan,
        limits: list[int],
        block_tables: tuple[tuple[int, ...], ...],
        keep_tokens: bool = False,
    ) -> PendingWindow | None:
        """Several greedy decode steps on the GPU path (``CudaDecoder.launch``), or None when
        that path has failed (it is then off for good, as in ``run``; the caller runs the
        step on the general path, which rewrites the same cache slots)."""
        # A decode plan (``CudaDecoder.fits``; a following window's chunks are the window
        # before's, whose keys the host has not extended yet).
        assert self.cuda_decoder is not None
        try:
            return self.cuda_decoder.launch(plan, limits, block_tables, keep_tokens)
        except Exception:
            log.exception("the GPU decode path failed; decoding on the general path now")
            self.cuda_decoder = None
            return None

    def window_result(self, pending: PendingWindow) -> Window | None:
        """A launched window's ids (waiting for them), or None if the device failed it (the
        GPU path is then off, as above)."""
        try:
            return pending.result()
        except Exception:
            log.exception("the GPU decode path failed; decoding on the general path now")
            self.cuda_decoder = None
            return None

    @torch.inference_mode()
    def run(self, plan: BatchPlan) -> StepResult:
        """Compute every chunk of ``plan``: logits of the sampling chunks, and whether each
        chunk's keys and values were all finite."""
        if self.cuda_decoder is not None and self.cuda_decoder.fits(plan):
            try:
                logits, nonfinite = self.cuda_decoder.run(plan)
                finite: list[bool] = (~nonfinite).tolist()
                return StepResult(logits, finite)
            except Exception:
                # A decode step holds no request's own tensors (no adapter, no prompt), so a
                # failure here is the path's (a kernel this GPU cannot compile, a capture
                # that runs out of memory): the general path serves from now on, this step
                # included (it rewrites the same cache slots).
                log.exception("the GPU decode path failed; decoding on the general path now")
                self.cuda_decoder = None
        flat = flatten(plan)
        self._copy_prefixes(plan, flat)
        vocab = decoder_config(self.model).vocab_size
        if plan.num_rows == 0:
            return StepResult(torch.empty(0, vocab), [True] * len(plan.chunks))
        dev = self.device
        embeds = self.embed(torch.tensor(plan.token_ids, dtype=torch.long, device=dev))
        for span in plan.embedding_spans:
            table = self.adapter_tensor(span.segment)
            embeds[span.row : span.row + span.length] = table[
                span.offset : span.offset + span.length
            ]
        meta = build_metadata(flat, self.kv_cache, dev, self.attention_backend)
        positions = torch.from_numpy(flat.positions).to(dev)
        if self.direct_decoder:
            hidden = run_decoder(self.model, embeds, positions, meta)
        else:
            decoder = cast(torch.nn.Module, self.model.model)  # the *ForCausalLM's decoder stack
            hidden = decoder(
                inputs_embeds=embeds.unsqueeze(0),
                position_ids=positions.unsqueeze(0),
                use_cache=False,
                ps_meta=meta,
            ).last_hidden_state[0]
        finite = _finite_chunks(meta.nonfinite.cpu().numpy(), flat)
        # Logits only where they are used: each sampling chunk's last row, and every row of a
        # chunk whose sequence scores its prompt (echo), after them.
        scored = [i for i, chunk in enumerate(plan.chunks) if wants_prompt_logits(chunk)]
        starts = plan.row_starts
        rows = np.concatenate(
            [flat.sample_rows] + [np.arange(starts[i], starts[i + 1]) for i in scored]
        )
        if not len(rows):
            return StepResult(torch.empty(0, vocab), finite)
        lm_head = cast(torch.nn.Module, self.model.lm_head)
        logits = lm_head(hidden[torch.from_numpy(rows).to(dev)]).float()
        num_sample = len(flat.sample_rows)
        prompt_logits, at = {}, num_sample
        for i in scored:
            n = plan.row_starts[i + 1] - plan.row_starts[i]
            prompt_logits[i] = logits[at : at + n]
            at += n
        return StepResult(logits[:num_sample], finite, prompt_logits)

    def _copy_prefixes(self, plan: BatchPlan, flat: FlatBatch) -> None:
        """Prefix-tuning virtual tokens: their K/V goes straight into the cache."""
        for copy in plan.prefix_copies:
            kv = self.adapter_tensor(copy.segment)  # [L, 2, Hkv, P, D]
            slots = torch.from_numpy(flat.slots(copy.chunk, copy.start, copy.length))
            src = kv[:, :, :, copy.offset : copy.offset + copy.length]
            self.kv_cache.index_copy_(3, slots.to(self.device), src)


def _attention_backend(model: PreTrainedModel, asked: str) -> str:
    """The attention backend to run: ``asked``, with "auto" settled for this model and
    machine: "native" where its kernel can run (a CPU model in float32 or bfloat16, the kernel
    built), else "fused". Raises ValueError for an unknown name, or for "native" where it
    cannot run (saying why)."""
    if asked != "auto" and asked not in BACKENDS:
        choices = ("auto", *BACKENDS)
        raise ValueError(f"attention backend {asked!r}: expected one of {choices}")
    if asked not in ("auto", "native"):
        return asked
    param = next(model.parameters())
    why = native.usable(param.device, param.dtype, head_dim_of(decoder_config(model)))
    if asked == "native":
        if why:
            raise ValueError(f"attention backend 'native': {why}")
        return "native"
    if not why:
        return "native"
    if param.device.type == "cpu":
        log.info("%s; attention runs on torch's fused kernel", why)
    return "fused"


def _finite_chunks(nonfinite_rows: np.ndarray, flat: FlatBatch) -> list[bool]:
    """Per chunk: no row of it wrote a non-finite key or value (a chunk without rows: True)."""
    bad = np.bincount(flat.chunk_of_row, weights=nonfinite_rows, minlength=flat.num_chunks)
    finite: list[bool] = (bad == 0).tolist()
    return finite
