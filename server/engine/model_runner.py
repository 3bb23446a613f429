"""The only module that runs the model: a flat batch of scheduled chunks in, logits out.

The base model's layers come from transformers; attention is routed to
``server.engine.attention`` (transformers' attention interface), which reads and writes the
paged KV cache owned here. Prefix-tuning virtual tokens never pass through the model: their
K/V is copied into the cache. Prompt/P-tuning virtual tokens enter as input embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from adapters_store.tiers import LRUTier
from server.engine import attention
from server.engine.attention import AttentionMetadata, SeqAttention, padded_batch
from server.engine.request import AdapterSegment, Sequence


@dataclass(frozen=True)
class Chunk:
    """Positions ``[start, end)`` of ``seq.key`` to compute this step; ``sample`` when the
    chunk reaches the end of the key, so the last row's logits pick the next token."""

    seq: Sequence
    start: int
    end: int

    @property
    def sample(self) -> bool:
        return self.end == len(self.seq.key)


class NonFiniteAdapter(ValueError):
    """An adapter's tensor is not finite at the runner's dtype (e.g. float32 values beyond
    bfloat16's range): it must never reach the KV cache, where other requests read beside it."""


class StepResult(NamedTuple):
    """What one forward gives back: float32 logits ``[n_sample, vocab]`` of the chunks whose
    ``sample`` is set, in the order given, and per chunk whether every key and value it wrote
    was finite (a chunk that was not is to be failed: its cache rows hold zeros)."""

    logits: torch.Tensor
    finite: list[bool]


@dataclass
class _SeqRows:
    chunk: Chunk
    rows: slice  # forward rows of this chunk in the flat batch
    positions: list[int]  # absolute position of each forward row


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * elem


class ModelRunner:
    """Owns the model and the KV cache tensor ``[L, 2, Hkv, num_blocks * block_size, D]``."""

    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        adapter_cache_bytes: int | None = None,
    ) -> None:
        attention.register()
        model.set_attn_implementation(attention.ATTENTION_NAME)
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_cache = torch.zeros(
            cfg.num_hidden_layers,
            2,
            cfg.num_key_value_heads,
            num_blocks * block_size,
            head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.embed = model.get_input_embeddings()
        # The device tier: adapter KV / embeddings on the device, LRU by bytes (None: unbounded).
        self.adapter_tier: LRUTier[str, torch.Tensor] = LRUTier(
            "device",
            capacity_bytes=adapter_cache_bytes,
            size_of=lambda t: t.numel() * t.element_size(),
        )

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
    def slots(self, seq: Sequence, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of ``positions`` of ``seq`` (on the CPU; callers move what they use)."""
        table = torch.tensor(seq.block_table, dtype=torch.long)
        bs = self.block_size
        return table[positions // bs] * bs + positions % bs

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> StepResult:
        """Compute every chunk: logits of the sampling chunks, finiteness of each chunk."""
        token_ids: list[int] = []
        positions: list[int] = []
        emb_rows: list[tuple[int, torch.Tensor]] = []
        seq_rows: list[_SeqRows] = []
        for chunk in chunks:
            first = len(positions)
            self._collect(chunk, token_ids, positions, emb_rows)
            seq_rows.append(_SeqRows(chunk, slice(first, len(positions)), positions[first:]))
        vocab = self.model.config.vocab_size
        if not positions:
            return StepResult(torch.empty(0, vocab), [True] * len(chunks))
        dev = self.device
        ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
        embeds = self.embed(ids.clamp(min=0))
        for row, vec in emb_rows:
            embeds[row] = vec
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        meta = self._metadata(seq_rows)
        hidden = self.model.model(
            inputs_embeds=embeds.unsqueeze(0),
            position_ids=pos.unsqueeze(0),
            use_cache=False,
            ps_meta=meta,
        ).last_hidden_state[0]
        bad = meta.nonfinite.cpu()
        finite = [not bool(bad[sr.rows].any()) for sr in seq_rows]
        last = [sr.rows.stop - 1 for sr in seq_rows if sr.chunk.sample]
        if not last:
            return StepResult(torch.empty(0, vocab), finite)
        logits = self.model.lm_head(hidden[torch.tensor(last, device=dev)])
        return StepResult(logits.float(), finite)

    def _collect(
        self,
        chunk: Chunk,
        token_ids: list[int],
        positions: list[int],
        emb_rows: list[tuple[int, torch.Tensor]],
    ) -> None:
        """Append the chunk's forward rows; copy prefix-tuning K/V straight into the cache."""
        seq, start, end = chunk.seq, chunk.start, chunk.end
        cursor = start
        for vs, ve, seg in seq.virtual:
            lo, hi = max(start, vs), min(end, ve)
            if lo >= hi:
                continue
            self._real_rows(seq, cursor, lo, token_ids, positions)
            tensor = self.adapter_tensor(seg)
            if seg.kind == "prefix_tuning":
                slots = self.slots(seq, torch.arange(lo, hi)).to(self.device)
                src = tensor[:, :, :, lo - vs : hi - vs]  # [L, 2, Hkv, n, D]
                self.kv_cache.index_copy_(3, slots, src)
            else:
                for p in range(lo, hi):
                    emb_rows.append((len(positions), tensor[p - vs]))
                    token_ids.append(-1)
                    positions.append(p)
            cursor = hi
        self._real_rows(seq, cursor, end, token_ids, positions)

    @staticmethod
    def _real_rows(
        seq: Sequence, lo: int, hi: int, token_ids: list[int], positions: list[int]
    ) -> None:
        if lo < hi:
            token_ids.extend(seq.key[lo:hi])  # type: ignore[arg-type]
            positions.extend(range(lo, hi))

    def _metadata(self, seq_rows: list[_SeqRows]) -> AttentionMetadata:
        """Sort the step's rows into decode units (one-token chunks, by group: complete
        attention over the shared segment once plus each member's suffix) and multi-token
        chunks (causal suffix attention, plus their group's shared segment merged by LSE)."""
        shared = self._shared_prefixes(seq_rows)
        bs, dev = self.block_size, self.device
        slot_parts: list[torch.Tensor] = []
        seqs: list[SeqAttention] = []
        decode: dict[object, list[tuple[int, torch.Tensor]]] = {}
        multi: dict[int, list[int]] = {}
        segments: dict[int, torch.Tensor] = {}
        for i, (sr, sh) in enumerate(zip(seq_rows, shared, strict=True)):
            n = sr.rows.stop - sr.rows.start
            if n == 0:
                continue
            # Every slot of the sequence up to the chunk's end, once; the parts are views.
            full = self.slots(sr.chunk.seq, torch.arange(sr.chunk.end))
            slot_parts.append(full[torch.tensor(sr.positions)])
            lo = sh[0] * bs if sh else 0
            if sh and sh[1] not in segments:
                segments[sh[1]] = full[:lo]
            suffix = full[lo:]
            if n == 1 and sr.chunk.end - sr.chunk.start == 1:
                decode.setdefault(sh[1] if sh else ("alone", i), []).append((sr.rows.start, suffix))
                continue
            qpos = torch.tensor(sr.positions, device=dev).unsqueeze(1)
            kpos = torch.arange(lo, sr.chunk.end, device=dev).unsqueeze(0)
            seqs.append(SeqAttention(sr.rows, suffix.to(dev), kpos > qpos))
            if sh:
                multi.setdefault(sh[1], []).extend(range(sr.rows.start, sr.rows.stop))
        units = [self._decode_unit(members, segments.get(g)) for g, members in decode.items()]
        return AttentionMetadata(
            kv_cache=self.kv_cache,
            nonfinite=torch.zeros(seq_rows[-1].rows.stop, dtype=torch.bool, device=dev),
            slot_mapping=torch.cat(slot_parts).to(dev),
            decode=padded_batch(units, dev) if units else None,
            seqs=seqs,
            shared=(
                padded_batch([(rows, segments[g], None) for g, rows in multi.items()], dev)
                if multi
                else None
            ),
        )

    @staticmethod
    def _decode_unit(
        members: list[tuple[int, torch.Tensor]], segment: torch.Tensor | None
    ) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
        """One decode unit: the shared segment (read once) then each member's suffix; member
        j's query sees the segment and its own suffix only."""
        if segment is None and len(members) == 1:
            row, suffix = members[0]
            return [row], suffix, None
        parts = ([segment] if segment is not None else []) + [s for _, s in members]
        slots = torch.cat(parts)
        hidden = torch.ones(len(members), len(slots), dtype=torch.bool)
        start = len(segment) if segment is not None else 0
        hidden[:, :start] = False
        for j, (_, suffix) in enumerate(members):
            hidden[j, start : start + len(suffix)] = False
            start += len(suffix)
        return [row for row, _ in members], slots, hidden

    def _shared_prefixes(self, seq_rows: list[_SeqRows]) -> list[tuple[int, int] | None]:
        """For each chunk, ``(n_blocks, group_id)`` of the cached segment it shares with other
        chunks of the batch, or None. Members of a group share their first ``n_blocks`` block
        ids, and every member's chunk starts at or after that segment."""
        by_first: dict[int, list[int]] = {}
        for i, sr in enumerate(seq_rows):
            c = sr.chunk
            if c.start >= self.block_size and sr.rows.stop > sr.rows.start:
                by_first.setdefault(c.seq.block_table[0], []).append(i)
        result: list[tuple[int, int] | None] = [None] * len(seq_rows)
        for first, idx in by_first.items():
            if len(idx) < 2:
                continue
            tables = [seq_rows[i].chunk.seq.block_table for i in idx]
            limit = min(seq_rows[i].chunk.start // self.block_size for i in idx)
            n = 0
            while n < limit and all(t[n] == tables[0][n] for t in tables):
                n += 1
            if n == 0:
                continue
            for i in idx:
                result[i] = (n, first)
        return result
