"""The step loop: schedule, run the model, sample, hand tokens back to each request.

Single-threaded and synchronous; the HTTP layer drives it from its own thread. Requests are
plain data (``Sequence``); only ``ModelRunner`` touches tensors of the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from server.engine.batch import BatchPlan, Chunk
from server.engine.cuda_decode import PendingWindow, Window
from server.engine.detokenizer import IncrementalText, Tokenizer
from server.engine.kv_cache import BlockPool
from server.engine.logprobs import record_prompt, token_logprobs
from server.engine.model_runner import (
    ModelRunner,
    NonFiniteAdapter,
    decoder_config,
    kv_bytes_per_token,
)
from server.engine.prefix_tree import PrefixTree
from server.engine.request import (
    AdapterSegment,
    InvalidRequest,
    RequestError,
    RequestOutput,
    SamplingParams,
    SeqStatus,
    Sequence,
)
from server.engine.sampler import NON_FINITE, make_generator, plain_greedy, sample
from server.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    kv_cache_memory: int = 1 << 30  # bytes for the KV block pool
    adapter_cache_bytes: int | None = 1 << 30  # device tier of adapter tensors; None: unbounded
    # "auto": "native" where it can run (a CPU model in float32 or bfloat16, and the kernel
    # built on this machine), else "fused". "native": the engine's C kernel over the paged
    # cache (``engine/native.py``), required; "fused": torch's fused attention kernel where
    # the device has one (the CPU's flash kernel); "reference": the plain torch matmul
    # backend, the test oracle.
    attention_backend: str = "auto"
    # "auto": the CPU's linear layers through oneDNN (``engine/cpu_kernels.py``); "torch":
    # as the model defines them; "onednn": required.
    linear_backend: str = "auto"
    # True: Llama, Mistral and Qwen2 layers run as the engine's own loop over the model's
    # modules (``engine/decoder.py``, same bits); False: always transformers' forward.
    direct_decoder: bool = True
    # On CUDA, decode steps run through the paged Triton kernel (``engine/cuda_decode.py``),
    # replayed as CUDA graphs when ``cuda_graphs`` (else run eagerly, for checks); the graphs
    # of every batch-size bucket are captured when the engine starts.
    cuda_graphs: bool = True
    # On that path, when every running request is greedy with nothing to adjust and no
    # logprobs, up to this many decode steps run back to back on the device, each fed the
    # token the one before chose, before the host reads their tokens (and applies stops,
    # which discard what a stopped request computed past its stop). 1: one step at a time.
    decode_window: int = 8
    # The decode graphs' block tables cover sequences of this many positions from the start;
    # a longer sequence widens them (to a power of two of blocks), which captures the graphs
    # again, mid-run.
    decode_context: int = 4096


@dataclass(frozen=True)
class _Window:
    """A window of decode steps on the device: its plan (each row's request and first
    position), each row's step count, and its ids on their way back."""

    plan: BatchPlan
    limits: list[int]
    pending: PendingWindow


@dataclass
class EngineStats:
    """Counters since start (the metrics layer exports them; prompt and cached-prompt token
    counters live on the scheduler, which sees admissions)."""

    computed_tokens: int = 0  # positions run through the model or copied as prefix KV
    generated_tokens: int = 0
    steps: int = 0
    failed_requests: int = 0  # stopped alone with an error while the rest of a step went on
    split_forwards: int = 0  # forwards that raised and were re-run as two halves


def sliding_window(config: object) -> int | None:
    """The attention window of a model that uses one (Mistral, Qwen2 with
    ``use_sliding_window``). Our attention reads every key, which is exact only while a
    sequence fits in the window, so the engine caps the context length there."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return None
    return int(window)


class LLMEngine:
    def __init__(self, model: PreTrainedModel, tokenizer: Tokenizer, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = tokenizer
        per_block = kv_bytes_per_token(decoder_config(model), next(model.parameters()).dtype)
        num_blocks = config.kv_cache_memory // (per_block * config.block_size)
        if num_blocks < 2:
            raise ValueError(f"--kv-cache-memory {config.kv_cache_memory} holds under 2 blocks")
        self.pool = BlockPool(num_blocks)
        self.tree = PrefixTree(config.block_size, self.pool)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.block_size),
            self.pool,
            self.tree,
        )
        self.runner = ModelRunner(
            model,
            num_blocks,
            config.block_size,
            config.adapter_cache_bytes,
            attention_backend=config.attention_backend,
            linear_backend=config.linear_backend,
            direct_decoder=config.direct_decoder,
        )
        if self.runner.device.type == "cuda" and self.runner.direct_decoder:
            why = self.runner.enable_cuda_decode(
                config.max_num_seqs, config.cuda_graphs, config.decode_window
            )
            if not why:
                assert self.runner.cuda_decoder is not None
                self.runner.cuda_decoder.reserve(config.decode_context)
            if why:
                log.warning("decode steps run eagerly: %s", why)
            elif config.cuda_graphs:
                self._capture_graphs()
        self.max_model_len = min(
            getattr(model.config, "max_position_embeddings", 1 << 30),
            num_blocks * config.block_size,
            sliding_window(model.config) or 1 << 30,
        )
        eos = getattr(tokenizer, "eos_token_id", None)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = {i for x in (eos, gen_eos) for i in ([x] if isinstance(x, int) else x or [])}
        self.eos_ids = tuple(sorted(ids))
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats()
        # A window of decode steps launched on the device and not settled yet (``step``).
        self._inflight: _Window | None = None

    def _capture_graphs(self) -> None:
        """Every bucket's decode graph now, not when a batch size is first met mid-run (a
        capture, with its kernels' compilation, takes seconds)."""
        cuda = self.runner.cuda_decoder
        assert cuda is not None
        log.info("capturing the decode graphs of %d batch sizes ...", len(cuda.buckets))
        try:
            cuda.capture()
        except Exception:
            log.exception("capturing the decode graphs failed; decoding on the general path")
            self.runner.cuda_decoder = None
            return
        log.info("decode graphs captured in %.1f s", cuda.capture_seconds)

    # Requests -----------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_ids: Seq[int],
        params: SamplingParams,
        adapters: Seq[AdapterSegment] = (),
        tenant: str = "default",
    ) -> Sequence:
        """Queue a request. Its key is the adapters' segments in order, then the prompt ids."""
        if request_id in self.seqs:
            raise InvalidRequest(f"request id {request_id!r} is already running", "request_id")
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = decoder_config(self.runner.model).vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        for name, ids in (
            ("logit_bias", [t for t, _ in params.logit_bias]),
            ("stop_token_ids", params.stop_token_ids),
        ):
            if any(t >= vocab for t in ids):
                raise InvalidRequest(f"{name}: token ids must be below {vocab}", name)
        key: list[Hashable] = []
        virtual = []
        for seg in adapters:
            if seg.kind == "text":
                key.extend(seg.token_ids)
            else:
                virtual.append((len(key), len(key) + seg.length, seg))
                key.extend((seg.key, i) for i in range(seg.length))
        key.extend(prompt_ids)
        if len(key) >= self.max_model_len:  # not even one token fits after it
            raise InvalidRequest(
                f"the prompt ({len(key)} positions, adapters included) leaves no room in the "
                f"context of {self.max_model_len} for a token to be generated",
                "prompt",
            )
        if len(key) + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(key)} positions, adapters included) plus max_tokens "
                f"({params.max_tokens}) exceeds the context of {self.max_model_len}",
                "max_tokens",
            )
        seq = Sequence(request_id, tenant, key, virtual, params, time.monotonic())
        seq.prompt_token_ids = [t for t in key if isinstance(t, int)]  # once, not every step
        seq.detok = IncrementalText(self.tokenizer)
        if params.temperature > 0:
            seq.generator = make_generator(params.seed)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        """Requests to run, or a window still on the device (the next ``step`` settles it,
        even when every request it holds has stopped since it was launched)."""
        return self.scheduler.has_unfinished() or self._inflight is not None

    # The loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration; returns an output for each request that got a token or finished.

        Containment: a request whose computation is not finite, whose token cannot be drawn, or
        whose part of the forward raises is stopped alone (``finish_reason`` "error"); the rest
        of the step goes on and gets exactly the tokens it would have got without it."""
        if self._inflight is not None:
            return self._settle_and_follow()
        out = self.scheduler.schedule()
        if not out.chunks:
            return []
        assert out.plan is not None  # the scheduler lays out a plan whenever it has chunks
        limits = self._window_limits(out.plan)
        if limits is not None:
            self._inflight = self._launch(out.plan, limits)
            if self._inflight is not None:
                return self._settle_and_follow()
        (forwarded, all_logits), failed = self._forward(out.plan)
        keep = [i for i, c in enumerate(forwarded) if c not in failed]
        sampling = [forwarded[i] for i in keep]
        tokens_of: dict[Chunk, int] = {}
        if sampling:
            assert all_logits is not None  # rows of every chunk that sampled
            # The forward's rows as they are when none failed (no copy), else the kept ones.
            logits = all_logits if len(keep) == len(forwarded) else all_logits[keep]
            drawn = sample(logits, [c.seq for c in sampling], self.eos_ids)
            for i, (chunk, tok) in enumerate(zip(sampling, drawn, strict=True)):
                if isinstance(tok, RequestError):
                    failed[chunk] = tok
                    continue
                tokens_of[chunk] = tok
                k = chunk.seq.params.logprobs
                if k is not None:  # of the raw logits (``sample`` adjusted a copy)
                    chunk.seq.logprobs += token_logprobs(logits[i : i + 1], [tok], k)
        outputs = [self._fail(chunk.seq, error) for chunk, error in failed.items()]
        kept = replace(out, chunks=[c for c in out.chunks if c not in failed])
        sampled = [c for c in kept.chunks if c.sample]  # before the tokens extend the keys
        self.scheduler.update_from_output(kept, [tokens_of[c] for c in sampled])
        self.stats.steps += 1
        self.stats.computed_tokens += kept.num_tokens
        self.stats.generated_tokens += len(sampled)
        return outputs + [self._after_token(c.seq) for c in sampled]

    def _window_limits(self, plan: BatchPlan) -> list[int] | None:
        """How many decode steps each chunk of ``plan`` runs back to back on the GPU path, its
        blocks reserved (``EngineConfig.decode_window``); None for one ordinary step."""
        cuda = self.runner.cuda_decoder
        if cuda is None or cuda.window <= 1 or not cuda.fits(plan):
            return None
        limits = []
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.params.logprobs is not None or not plain_greedy(seq, self.eos_ids):
                return None
            limits.append(min(cuda.window, seq.params.max_tokens - len(seq.output_ids)))
        if max(limits) <= 1:
            return None
        ends = [(c.seq, c.end + k - 1) for c, k in zip(plan.chunks, limits, strict=True)]
        return limits if self.scheduler.reserve_ahead(ends) else None

    def _launch(self, plan: BatchPlan, limits: list[int], follows: bool = False) -> _Window | None:
        """Start a window on the device (its blocks reserved); None if the GPU path failed.
        ``follows``: it takes the tokens the window before it left on the device."""
        bs = self.config.block_size
        tables = tuple(
            tuple(c.seq.block_table[: -(-(n + k - 1) // bs)])
            for c, n, k in zip(plan.chunks, plan.context_lens, limits, strict=True)
        )
        pending = self.runner.launch_window(plan, limits, tables, keep_tokens=follows)
        return None if pending is None else _Window(plan, limits, pending)

    def _follow(self, window: _Window) -> _Window | None:
        """The window after ``window``, launched before ``window``'s ids are read (so the
        device runs it while the host settles them), when nothing can change the batch in
        between: every row runs the whole window and has tokens left after it, every request
        is still running, none is waiting for a seat, and the blocks are free. Its rows are
        ``window``'s, one window on; a row whose request stops inside ``window`` computes
        what nobody reads (its blocks are its own until ``_settle`` gives them back)."""
        cuda = self.runner.cuda_decoder
        if cuda is None:
            return None
        size = cuda.window
        plan = window.plan
        seqs = [c.seq for c in plan.chunks]
        if min(window.limits) < size or any(s.status != SeqStatus.RUNNING for s in seqs):
            return None
        waiting = self.scheduler.num_waiting()
        if waiting and len(self.scheduler.running) < self.config.max_num_seqs:
            return None  # settle first: the next schedule admits them
        # Tokens each has left after ``window``'s (its outputs do not hold them yet).
        left = [s.params.max_tokens - len(s.output_ids) - size for s in seqs]
        if min(left) < 1:
            return None
        limits = [min(size, n) for n in left]
        lens = [n + size for n in plan.context_lens]
        reach = max(n + k - 1 for n, k in zip(lens, limits, strict=True))
        if not cuda.can_follow(len(seqs), reach):
            return None
        ends = [(s, n + k - 1) for s, n, k in zip(seqs, lens, limits, strict=True)]
        if not self.scheduler.reserve_ahead(ends):
            return None
        nxt = replace(
            plan,
            positions=tuple(p + size for p in plan.positions),
            context_lens=tuple(lens),
        )
        return self._launch(nxt, limits, follows=True)

    def _settle_and_follow(self) -> list[RequestOutput]:
        """Launch the window that follows the one in flight (when it can), then settle the
        one in flight."""
        window = self._inflight
        assert window is not None
        self._inflight = self._follow(window)
        result = self.runner.window_result(window.pending)
        if result is None:  # the GPU path failed: nothing of it is taken, nor of the next
            self._inflight = None
            return []
        return self._settle(window, result)

    def _settle(self, window: _Window, result: Window) -> list[RequestOutput]:
        """Hand a window's tokens to its requests step by step, as ``step`` would have: a
        request that stops (or fails) keeps nothing computed after that. A row whose
        request is no longer running (aborted, or stopped in the window before) or is not
        where the window started it is passed over."""
        plan, limits = window.plan, window.limits
        ids, nonfinite = result.ids.tolist(), result.nonfinite.tolist()
        live = [
            (i, c)
            for i, c in enumerate(plan.chunks)
            if c.seq.status == SeqStatus.RUNNING and c.seq.num_computed == plan.positions[i]
        ]
        outputs: dict[str, RequestOutput] = {}
        # Reported once, after the window; None: decoded then (``_settle_token``'s lazy).
        texts: dict[str, tuple[Sequence, str | None]] = {}
        for k in range(len(ids)):
            accepted: list[Chunk] = []
            tokens: list[int] = []
            for i, chunk in live:
                if k >= limits[i]:
                    continue
                seq = chunk.seq
                if nonfinite[k][i] or ids[k][i] < 0:
                    error = RequestError("non_finite", NON_FINITE)
                    outputs[seq.request_id] = self._fail(seq, error)
                    continue
                accepted.append(Chunk(seq, seq.num_computed, seq.num_computed + 1))
                tokens.append(ids[k][i])
            if not accepted:
                break
            self.scheduler.update_from_output(SchedulerOutput(accepted), tokens)
            self.stats.steps += 1
            self.stats.computed_tokens += len(accepted)
            self.stats.generated_tokens += len(accepted)
            for chunk in accepted:
                text = self._settle_token(chunk.seq, lazy=True)
                texts[chunk.seq.request_id] = (chunk.seq, text)
            live = [(i, c) for i, c in live if c.seq.status == SeqStatus.RUNNING]
        for rid, (seq, text) in texts.items():
            if rid not in outputs:  # a failure's output stands
                outputs[rid] = self.output(seq, self.decode(seq) if text is None else text)
        return list(outputs.values())

    def _forward(
        self, plan: BatchPlan
    ) -> tuple[tuple[list[Chunk], torch.Tensor | None], dict[Chunk, RequestError]]:
        """Run ``plan``: the sampling chunks whose forward ran (in plan order) with their
        logits rows ``[n, vocab]`` (None for none), and the chunks that failed.

        A forward that raises is run again in halves, down to single chunks, so the chunk that
        raises is found and failed alone. Re-running is safe: a chunk writes only its own
        sequence's blocks (cached blocks come before ``chunk.start``), with the same values."""
        chunks = plan.chunks
        try:
            result = self.runner.run(plan)
        except Exception as exc:
            if len(chunks) == 1:
                if isinstance(exc, NonFiniteAdapter):
                    return ([], None), {chunks[0]: RequestError("non_finite", str(exc))}
                log.exception("engine forward failed for request %s", chunks[0].seq.request_id)
                error = RequestError("engine", f"the engine failed on this request: {exc}")
                return ([], None), {chunks[0]: error}
            self.stats.split_forwards += 1
            mid = len(chunks) // 2
            (first, rows), failed = self._forward(plan.subset(range(mid)))
            (second, more_rows), more_failed = self._forward(plan.subset(range(mid, len(chunks))))
            parts = [t for t in (rows, more_rows) if t is not None]
            joined = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else None)
            return (first + second, joined), {**failed, **more_failed}
        sampled = [c for c in chunks if c.sample]
        assert len(sampled) == len(result.logits)
        failed = {
            c: RequestError("non_finite", NON_FINITE)
            for c, ok in zip(chunks, result.finite, strict=True)
            if not ok
        }
        for index, logits in result.prompt_logits.items():  # echo: every row's logits
            if chunks[index] not in failed:
                lo, hi = plan.row_starts[index], plan.row_starts[index + 1]
                record_prompt(chunks[index].seq, plan.positions[lo:hi], logits)
        return (sampled, result.logits), failed

    def _fail(self, seq: Sequence, error: RequestError) -> RequestOutput:
        """Stop ``seq`` alone: its blocks are released and none of them enters the prefix
        cache (what it computed is not trusted)."""
        log.warning("request %s failed alone: %s", seq.request_id, error.message)
        self.stats.failed_requests += 1
        seq.error = error
        self.scheduler.finish(seq, "error")
        self.seqs.pop(seq.request_id, None)
        return self.output(seq, seq.detok.text if seq.detok is not None else "")

    def _after_token(self, seq: Sequence) -> RequestOutput:
        text = self._settle_token(seq)
        assert text is not None  # decoded: not lazy
        return self.output(seq, text)

    def _settle_token(self, seq: Sequence, lazy: bool = False) -> str | None:
        """Decode the new token, stop if due (cutting at a stop string); the output's text.
        A finishing request's text is completed once more if a character was held back.
        ``lazy``: a request without stop strings that does not stop here is not decoded
        (None): its text only matters when it is reported, so a window decodes it once."""
        if lazy and not seq.params.stop and self._stop_reason(seq, None) is None:
            return None
        text = self.decode(seq)
        cut = self._stop_string(seq, text) if seq.params.stop else None
        reason = self._stop_reason(seq, cut)
        if reason is not None and cut is None:
            final = self.decode(seq, final=True)  # with a character held back, if any
            if final != text:
                text = final
                cut = self._stop_string(seq, text) if seq.params.stop else None
                reason = self._stop_reason(seq, cut)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.seqs.pop(seq.request_id, None)
            if cut is not None:
                text = text[:cut]
        return text

    def _stop_reason(self, seq: Sequence, stop_at: int | None) -> str | None:
        p, out = seq.params, seq.output_ids
        if len(out) >= p.min_tokens:
            last = out[-1]
            if (not p.ignore_eos and last in self.eos_ids) or last in p.stop_token_ids:
                return "stop"
            if stop_at is not None:
                return "stop"
        if len(out) >= p.max_tokens:
            return "length"
        return None

    def _stop_string(self, seq: Sequence, text: str) -> int | None:
        """Index in ``text`` (the decoded output) where the first stop string starts, or None.
        Only text after the first ``min_tokens`` tokens can stop a request.

        Linear in the output: the text only grows, so each call searches only what is new plus
        the longest stop string's length - 1 before it (a stop string may straddle the two);
        the detokenizer's rare rewrite of the whole text sends the search back to the start."""
        p = seq.params
        if len(seq.output_ids) < p.min_tokens:
            return None  # nothing can stop it yet (_stop_reason would ignore a hit)
        if seq.stop_search_from is None:  # the first min_tokens tokens never change: once
            seq.stop_search_from = len(
                self.tokenizer.decode(seq.output_ids[: p.min_tokens], skip_special_tokens=True)
            )
        start = seq.stop_search_from
        detok = seq.detok
        assert detok is not None  # set by add_request
        if detok.rewrites == seq.stop_rewrites:
            longest = max(len(s) for s in p.stop)
            start = max(start, seq.stop_scanned - longest + 1)
        seq.stop_scanned, seq.stop_rewrites = len(text), detok.rewrites
        hits = [i for s in p.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def decode(self, seq: Sequence, final: bool = False) -> str:
        """The output's text so far (a trailing EOS excluded), decoded incrementally; while
        not ``final``, an incomplete character at the end is held back."""
        ids = seq.output_ids
        if ids and not seq.params.ignore_eos and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        assert seq.detok is not None  # set by add_request
        return seq.detok.final(ids) if final else seq.detok.update(ids)

    def output(self, seq: Sequence, text: str) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_ids),
            text=text,
            finished=seq.status == SeqStatus.FINISHED,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt,
            num_cached_tokens=seq.num_cached_prompt,
            queue_s=None if seq.first_scheduled is None else seq.first_scheduled - seq.arrival,
            error=seq.error,
            logprobs=None if seq.params.logprobs is None else list(seq.logprobs),
            # Complete before the first token: never written again, so shared, not copied.
            prompt_logprobs=seq.prompt_logprobs,
        )
