"""Decode steps on CUDA: flat static buffers, the paged Triton kernel, one CUDA graph per
batch-size bucket.

A decode step (every chunk one new row that samples, nothing copied into the cache, no
embedding rows, no prompt scores) has the same shapes whatever the sequences' lengths once its
batch is padded to a bucket: token ids, positions and cache slots ``[B]``, key counts ``[B]``,
block tables ``[B, max_blocks]``. The step's integers go to the device in one copy, into one
buffer whose views every graph reads; the graph runs the embedding, the decoder stack (with
``triton_attention.paged_decode``) and the LM head, and leaves the logits and each row's
"not finite" flag in its own output tensors. No Python runs per layer and nothing waits for the
device inside a step; the caller reads the logits once (sampling).

Padding rows of a bucket read and write one scratch block past the pool's blocks (the runner
allocates it), so they never touch a sequence's keys. Everything else (prefill, prompt
scores, adapters' virtual tokens) runs eagerly through the general path; so does every step
with ``use_graphs=False``, which runs the same function uncaptured (graph replay gives the
same bits, which the GPU tests check).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from server.engine.batch import BatchPlan
from server.engine.flat import block_table_array
from server.engine.logprobs import wants_prompt_logits
from server.engine.triton_attention import PagedDecode, paged_decode, splits_for, workspace
from server.engine.triton_layers import add_rms_norm, greedy_advance, rope_write, silu_mul

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Shared-prefix groups a decode step reads segment by segment (the largest first); rows of
# any group beyond them read their whole context as their own keys (the same result). Each
# slot is a row of programs in the captured grid, which exit at once when unused.
MAX_GROUPS = 8


def is_decode_step(plan: BatchPlan) -> bool:
    """Every chunk is one row that samples; no virtual tokens; no prompt scores."""
    return (
        plan.num_rows == len(plan.chunks) > 0
        and not plan.prefix_copies
        and not plan.embedding_spans
        and all(c.sample and not wants_prompt_logits(c) for c in plan.chunks)
    )


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's weights as the fused step reads them."""

    norm1: torch.Tensor
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * D, hidden]: q, k and v projections stacked
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    norm2: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate, then up
    gate_up_bias: torch.Tensor | None  # Llama's mlp_bias
    down: torch.Tensor
    down_bias: torch.Tensor | None
    scale: float
    eps1: float
    eps2: float


def _stack(modules: list[Any], name: str) -> torch.Tensor | None:
    """The modules' ``name`` tensors (weights or biases) stacked along the output dimension,
    each module's own then a view of its rows (nothing is held twice). None if they have
    none."""
    parts = [getattr(m, name) for m in modules]
    if any(p is None for p in parts):
        assert all(p is None for p in parts), f"some projections have a {name}, some not"
        return None
    stacked = torch.cat([p.detach() for p in parts])
    at = 0
    for m, p in zip(modules, parts, strict=True):
        rows = p.shape[0]
        setattr(m, name, torch.nn.Parameter(stacked[at : at + rows], requires_grad=False))
        at += rows
    return stacked


def fuse_layers(model: torch.nn.Module) -> list[_Layer]:
    """Each layer's q/k/v and gate/up projections as one product each (``_stack``)."""
    layers = []
    for layer in cast(Any, model).model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_proj, mlp.up_proj]
        layers.append(
            _Layer(
                norm1=layer.input_layernorm.weight,
                qkv_bias=_stack(qkv, "bias"),
                qkv=cast(torch.Tensor, _stack(qkv, "weight")),
                o=attn.o_proj.weight,
                o_bias=attn.o_proj.bias,
                norm2=layer.post_attention_layernorm.weight,
                gate_up_bias=_stack(gate_up, "bias"),
                gate_up=cast(torch.Tensor, _stack(gate_up, "weight")),
                down=mlp.down_proj.weight,
                down_bias=mlp.down_proj.bias,
                scale=float(attn.scaling),
                eps1=float(layer.input_layernorm.variance_epsilon),
                eps2=float(layer.post_attention_layernorm.variance_epsilon),
            )
        )
    return layers


def fused_decoder(
    model: torch.nn.Module,
    layers: list[_Layer],
    embeds: torch.Tensor,
    positions: torch.Tensor,
    kv_cache: torch.Tensor,
    slots: torch.Tensor,
    flags: torch.Tensor,
    paged: PagedDecode,
) -> torch.Tensor:
    """The decoder stack for one decode row per sequence, ten kernels a layer: the final-norm
    hidden states ``[B, hidden]``."""
    decoder = cast(Any, model).model
    rows = embeds.shape[0]
    cos, sin = decoder.rotary_emb(embeds, positions.unsqueeze(0))  # [1, B, D] each
    cos, sin = cos[0].contiguous(), sin[0].contiguous()
    hq = cast(Any, model).config.num_attention_heads
    hkv = kv_cache.shape[2]
    linear = torch.nn.functional.linear
    work = workspace(rows, hq, cos.shape[-1], paged, embeds.device)
    h, residual = add_rms_norm(embeds, None, layers[0].norm1, layers[0].eps1)
    for index, w in enumerate(layers):
        qkv = linear(h, w.qkv, w.qkv_bias)
        k_cache, v_cache = kv_cache[index, 0], kv_cache[index, 1]
        q = rope_write(qkv, cos, sin, k_cache, v_cache, slots, flags, hq, hkv)
        out = paged_decode(q.transpose(0, 1), k_cache, v_cache, paged, w.scale, work)
        attn = linear(out.transpose(0, 1).reshape(rows, -1), w.o, w.o_bias)
        h, residual = add_rms_norm(attn, residual, w.norm2, w.eps2)
        down = linear(silu_mul(linear(h, w.gate_up, w.gate_up_bias)), w.down, w.down_bias)
        if index + 1 < len(layers):
            h, residual = add_rms_norm(
                down, residual, layers[index + 1].norm1, layers[index + 1].eps1
            )
        else:
            h, residual = add_rms_norm(
                down, residual, decoder.norm.weight, decoder.norm.variance_epsilon
            )
    return h


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [B, vocab] in the model's dtype
    nonfinite: torch.Tensor  # [B] bool


@dataclass(frozen=True)
class Window:
    """What a run of decode steps gave: per step and row the greedy token (-1 where the row's
    logits were not all finite) and whether the row wrote a key or value that was not finite;
    ``[steps, n]`` each. A row's entries past its own step count are meaningless."""

    ids: np.ndarray  # int32
    nonfinite: np.ndarray  # bool


@dataclass
class PendingWindow:
    """A window launched on the device whose ids are on their way back (``result`` waits)."""

    ids: torch.Tensor  # pinned host views [steps, n] the device copies into
    flags: torch.Tensor
    done: torch.cuda.Event | None  # recorded after the copies (None on the CPU: done)

    def result(self) -> Window:
        if self.done is not None:
            self.done.synchronize()
        return Window(self.ids.numpy().copy(), self.flags.numpy().copy())


class CudaDecoder:
    """Runs decode steps of up to ``max_seqs`` sequences. The block tables' width starts at
    ``max_blocks`` and doubles when a step needs more (the graphs are then captured again)."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        block_size: int,
        scratch_block: int,
        max_seqs: int,
        max_blocks: int = 256,
        use_graphs: bool = True,
        window: int = 8,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.buckets = [b for b in BUCKETS if b < max_seqs] + [max_seqs]
        self.use_graphs = use_graphs
        self.window = max(1, window)  # the most steps ``launch`` runs at once
        self.capture_seconds = 0.0  # spent capturing graphs (and compiling their kernels)
        self.layers = fuse_layers(model)
        device = kv_cache.device
        # Enough programs to fill the device twice over (the CPU: the tests' interpreter runs).
        sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 1
        )
        self._programs = 2 * sms
        self._allocate(max_blocks)

    def _allocate(self, max_blocks: int) -> None:
        """Buffers for tables ``max_blocks`` wide; any graph captured before is dropped."""
        top = self.buckets[-1]
        groups = min(MAX_GROUPS, max(1, top // 2))  # a group has two members or more
        device = self.kv_cache.device
        self.max_blocks = max_blocks
        # One int32 buffer holding every integer of a step (``_views`` names the parts),
        # pinned on the host so that the copy is one DMA.
        sizes = {
            "tokens": top,
            "positions": top,
            "slots": top,
            "lens": top,
            "limits": top,
            "step": 1,
            "starts": top,
            "seg_lens": groups,
            "members": groups * top,
            "tables": top * max_blocks,
            "seg_tables": groups * max_blocks,
        }
        self._at: dict[str, int] = {}
        at = 0
        for name, size in sizes.items():
            self._at[name] = at
            at += size
        # Two host buffers taken in turn: the next window's integers are written while the
        # last one's copy may still be on its way (``_fill`` waits for the copy of the one
        # it takes).
        pinned = device.type == "cuda"
        self._hosts = [torch.zeros(at, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._dev = torch.zeros(at, dtype=torch.int32, device=device)
        self._nonfinite = torch.zeros(top, dtype=torch.bool, device=device)
        # Each step's greedy ids and flags, by step of the window (``_advance``), and two
        # pinned host copies taken in turn (a window's ids are read while the next runs).
        self._ids = torch.zeros(self.window, top, dtype=torch.int32, device=device)
        self._flags = torch.zeros(self.window, top, dtype=torch.bool, device=device)
        shape = (2, self.window, top)
        self._host_ids = torch.zeros(shape, dtype=torch.int32, pin_memory=pinned)
        self._host_flags = torch.zeros(shape, dtype=torch.bool, pin_memory=pinned)
        self._windows = 0
        self._graphs: dict[int, _Graph] = {}
        self._host_views: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._pool: Any = None

    def reserve(self, tokens: int) -> None:
        """Make the block tables wide enough for sequences of ``tokens`` positions now, rather
        than when a step first needs it (which captures the graphs again, mid-run)."""
        blocks = -(-tokens // self.block_size)
        if blocks > self.max_blocks:
            self._allocate(1 << (blocks - 1).bit_length())

    def can_follow(self, rows: int, tokens: int) -> bool:
        """Whether a window of ``rows`` rows reaching ``tokens`` keys can follow the last one
        on the device as it is: its tables wide enough and its graph captured (widening or
        capturing rewrites the buffers, the last window's ids among them)."""
        wide = -(-tokens // self.block_size) <= self.max_blocks
        return wide and (not self.use_graphs or self.bucket(rows) in self._graphs)

    def fits(self, plan: BatchPlan) -> bool:
        return len(plan.chunks) <= self.buckets[-1] and is_decode_step(plan)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    # Buffers ------------------------------------------------------------------------------
    def _part(self, buffer: torch.Tensor, name: str, *shape: int) -> torch.Tensor:
        at = self._at[name]
        size = int(np.prod(shape))
        return buffer[at : at + size].view(*shape)

    def _views(self, batch: int) -> dict[str, torch.Tensor]:
        """The buffer's parts for a batch of ``batch`` rows (the graph of that bucket reads
        these addresses; each step writes them)."""
        return self._parts(self._dev, batch)

    def _parts(self, buffer: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
        groups = min(MAX_GROUPS, max(1, batch // 2))
        width = self.max_blocks
        return {
            **{n: self._part(buffer, n, batch) for n in ("tokens", "positions", "slots")},
            **{n: self._part(buffer, n, batch) for n in ("lens", "limits", "starts")},
            "step": self._part(buffer, "step", 1),
            "seg_lens": self._part(buffer, "seg_lens", groups),
            "members": self._part(buffer, "members", groups, batch),
            "tables": self._part(buffer, "tables", batch, width),
            "seg_tables": self._part(buffer, "seg_tables", groups, width),
        }

    def _host_parts(self, batch: int) -> dict[str, np.ndarray]:
        """``_parts`` of the host buffer in turn as numpy arrays, made once per bucket."""
        found = self._host_views.get((self._turn, batch))
        if found is None:
            parts = self._parts(self._hosts[self._turn], batch)
            found = {k: v.numpy() for k, v in parts.items()}
            self._host_views[(self._turn, batch)] = found
        return found

    def _fill(
        self,
        plan: BatchPlan,
        batch: int,
        limits: list[int] | None = None,
        block_tables: tuple[tuple[int, ...], ...] | None = None,
        keep_tokens: bool = False,
    ) -> None:
        """Write the plan (padded to ``batch`` rows) into a host buffer and copy it over.
        ``limits``: how many steps each row runs (one each by default); ``block_tables``:
        the rows' tables when they hold more blocks than the plan's (for the later steps of
        a window); ``keep_tokens``: the device's token ids stay (the ids a window before
        chose there, unknown to the host yet). Padding rows read and write the scratch block;
        unused groups have no keys. A row's table columns past its own blocks keep whatever
        they held: the kernels read a row's table only below its key count."""
        n, bs = len(plan.chunks), self.block_size
        self._turn ^= 1
        copied = self._copied[self._turn]
        if copied is not None:  # this buffer's last copy has left it
            copied.synchronize()
        host = self._host_parts(batch)
        positions = np.asarray(plan.positions, dtype=np.int64)
        tables = block_table_array(block_tables or plan.block_tables)
        host["tokens"][:n] = plan.token_ids
        host["tokens"][n:] = 0
        host["positions"][:n] = positions
        host["positions"][n:] = 0
        host["slots"][:n] = tables[np.arange(n), positions // bs] * bs + positions % bs
        host["slots"][n:] = self.scratch_block * bs
        host["lens"][:n] = plan.context_lens
        host["lens"][n:] = 1
        host["limits"][:n] = 1 if limits is None else limits
        host["limits"][n:] = 0
        host["step"][0] = 0
        host["tables"][:n, : tables.shape[1]] = tables
        host["tables"][n:, 0] = self.scratch_block
        host["starts"][:] = 0
        host["seg_lens"][:] = 0
        host["members"][:] = -1
        # The groups that save the most reading: members x segment length.
        groups = sorted(
            (g for g in plan.groups if g.num_blocks > 0),
            key=lambda g: len(g.members) * g.num_blocks,
            reverse=True,
        )
        for index, group in enumerate(groups[: len(host["seg_lens"])]):
            members = np.asarray(group.members)
            host["starts"][members] = group.num_blocks * bs
            host["seg_lens"][index] = group.num_blocks * bs
            host["members"][index, : len(members)] = members
            host["seg_tables"][index, : group.num_blocks] = tables[members[0], : group.num_blocks]
        skip = self._at["positions"] if keep_tokens else 0  # the tokens come first
        self._dev[skip:].copy_(self._hosts[self._turn][skip:], non_blocking=True)
        if self._dev.is_cuda:
            copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            copied.record()
            self._copied[self._turn] = copied

    # The step -----------------------------------------------------------------------------
    def _forward(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step on the buffers' first ``batch`` rows: logits (the model's dtype) and row
        flags; the buffers are left holding the next step's inputs (``_advance``)."""
        v = self._views(batch)
        nonfinite = self._nonfinite[:batch]
        nonfinite.zero_()
        hkv = self.kv_cache.shape[2]
        paged = PagedDecode(
            v["tables"],
            v["lens"],
            self.block_size,
            splits_for(batch, hkv, self._programs),
            starts=v["starts"],
            seg_tables=v["seg_tables"],
            seg_lens=v["seg_lens"],
            members=v["members"],
        )
        model = cast(Any, self.model)
        embeds = model.get_input_embeddings()(v["tokens"].long())
        hidden = fused_decoder(
            self.model,
            self.layers,
            embeds,
            v["positions"].long(),
            self.kv_cache,
            v["slots"],
            nonfinite,
            paged,
        )
        logits = model.lm_head(hidden)  # the model's dtype: ``run`` widens the rows it returns
        self._advance(v, logits, nonfinite)
        return logits, nonfinite

    def _advance(
        self, v: dict[str, torch.Tensor], logits: torch.Tensor, nonfinite: torch.Tensor
    ) -> None:
        """After a step, on the device (``triton_layers.greedy_advance``): record each row's
        greedy id and flag under the step's index, and make the buffers the next step's, each
        row fed the id it chose."""
        greedy_advance(
            logits,
            nonfinite,
            self._ids[:, : logits.shape[0]],
            self._flags[:, : logits.shape[0]],
            v["step"],
            v["tokens"],
            v["positions"],
            v["slots"],
            v["lens"],
            v["limits"],
            v["tables"],
            self.block_size,
            self.scratch_block * self.block_size,
        )

    def _graph_for(self, batch: int) -> _Graph:
        found = self._graphs.get(batch)
        if found is not None:
            return found
        # Capture on padding rows only (scratch slots), after two eager runs on a side stream
        # (Triton compiles, cuBLAS picks its kernels, lazily made tensors exist); each run
        # starts at step 0 of a window (the step index addresses the ids' rows).
        began = time.perf_counter()
        self._fill_padding(batch)
        step = self._parts(self._dev, batch)["step"]
        stream = torch.cuda.Stream(self.kv_cache.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step.zero_()
                self._forward(batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, nonfinite = self._forward(batch)
        torch.cuda.synchronize()
        found = _Graph(graph, logits, nonfinite)
        self._graphs[batch] = found
        took = time.perf_counter() - began
        self.capture_seconds += took
        log.info("captured the decode graph of %d rows in %.1f s", batch, took)
        return found

    def _fill_padding(self, batch: int) -> None:
        torch.cuda.synchronize()  # no copy from the host buffers is on its way
        buffer = self._hosts[self._turn]
        host = {k: v.numpy() for k, v in self._parts(buffer, batch).items()}
        buffer.zero_()
        host["slots"][:] = self.scratch_block * self.block_size
        host["lens"][:] = 1
        host["tables"][:] = self.scratch_block
        host["members"][:] = -1
        self._dev.copy_(buffer)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def capture(self, sizes: list[int] | None = None) -> None:
        """Capture the graphs of ``sizes`` (all buckets by default), largest first, so that
        the smaller ones reuse its memory."""
        for batch in sorted(sizes or self.buckets, reverse=True):
            self._graph_for(self.bucket(batch))

    def run(self, plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's float32 logits ``[n, vocab]`` and "not finite" flags ``[n]`` (device
        tensors owned by the graph: read them before the next step)."""
        n = len(plan.chunks)
        batch = self.bucket(n)
        self.reserve(max(plan.context_lens))
        if not self.use_graphs:
            self._fill(plan, batch)
            logits, nonfinite = self._forward(batch)
            return logits[:n].float(), nonfinite[:n]
        graph = self._graph_for(batch)
        self._fill(plan, batch)
        graph.graph.replay()
        return graph.logits[:n].float(), graph.nonfinite[:n]

    def launch(
        self,
        plan: BatchPlan,
        limits: list[int],
        block_tables: tuple[tuple[int, ...], ...],
        keep_tokens: bool = False,
    ) -> PendingWindow:
        """Up to ``self.window`` greedy decode steps back to back, with no host work between
        them: row i runs ``limits[i]`` steps, each fed the token the step before chose, its
        table ``block_tables[i]`` holding the blocks of every position it reaches. One copy
        over, one back, nothing waited for: the returned window's ``result`` waits.
        ``keep_tokens``: the first step's tokens are the ones the last window left on the
        device (a window that follows one whose ids the host has not read yet; the rows
        must be the same, in the same order)."""
        n, steps = len(plan.chunks), max(limits)
        assert len(limits) == n and 1 <= steps <= self.window
        batch = self.bucket(n)
        self.reserve(max(c + k - 1 for c, k in zip(plan.context_lens, limits, strict=True)))
        graph = self._graph_for(batch) if self.use_graphs else None
        self._fill(plan, batch, limits, block_tables, keep_tokens)
        for _ in range(steps):
            if graph is not None:
                graph.graph.replay()
            else:
                self._forward(batch)
        slot = self._windows % 2
        self._windows += 1
        ids, flags = self._host_ids[slot, :steps, :n], self._host_flags[slot, :steps, :n]
        ids.copy_(self._ids[:steps, :n], non_blocking=True)
        flags.copy_(self._flags[:steps, :n], non_blocking=True)
        done = None
        if self._dev.is_cuda:
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
        return PendingWindow(ids, flags, done)
