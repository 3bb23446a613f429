"""The GPU decode path (``engine/cuda_decode.py``) run uncaptured on the CPU, its attention
under Triton's interpreter: the same greedy tokens as the CPU engine, batches padded to their
bucket, shared prefixes, an adapter's virtual tokens, the block tables' width growing mid-run.
Graph capture itself needs CUDA (``tests/gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.w3 import IdsTokenizer
from server.engine.batch import build_plan
from server.engine.cuda_decode import CudaDecoder, is_decode_step
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.request import AdapterSegment, RequestOutput, SamplingParams

pytestmark = pytest.mark.triton_interpreter

CONFIG = LlamaConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    model = LlamaForCausalLM(CONFIG).eval()
    with torch.no_grad():  # larger weights: peaked logits, no near ties between backends
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def _engine(
    model,
    decoder: bool,
    calls: list[int] | None = None,
    window: int = 1,
    windows: list[list[int]] | None = None,
    kv_cache_memory: int = 1 << 20,
    follows: list[bool] | None = None,
) -> LLMEngine:
    """An engine on the CPU; with ``decoder``, decode steps take the GPU path uncaptured,
    ``window`` of them at once, the rows of each single step appended to ``calls``, each
    window's per-row step counts to ``windows`` and whether it followed the one before on
    the device (its tokens left there) to ``follows``."""
    config = EngineConfig(
        block_size=4, max_num_seqs=6, max_num_batched_tokens=256, kv_cache_memory=kv_cache_memory
    )
    engine = LLMEngine(model, IdsTokenizer(), config)
    if decoder:
        runner = engine.runner
        cuda = CudaDecoder(
            model,
            runner.kv_cache,
            4,
            runner.num_blocks,
            6,
            max_blocks=4,
            use_graphs=False,
            window=window,
        )
        run, launch = cuda.run, cuda.launch

        def counted(plan):
            calls.append(len(plan.chunks))
            return run(plan)

        def counted_window(plan, limits, tables, keep_tokens=False):
            if windows is not None:
                windows.append(list(limits))
            if follows is not None:
                follows.append(keep_tokens)
            return launch(plan, limits, tables, keep_tokens)

        cuda.run, cuda.launch = counted, counted_window
        runner.cuda_decoder = cuda
    return engine


def _finish(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Step ``engine`` until every request is done: each one's final output by id."""
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def _generate(engine: LLMEngine, adapter: AdapterSegment) -> dict[str, list[int]]:
    rng = np.random.default_rng(0)
    system = rng.integers(3, 96, 23).tolist()  # shared by four requests: a group
    prompts = [system + rng.integers(3, 96, n).tolist() for n in (3, 9, 1, 14)]
    prompts += [rng.integers(3, 96, 5).tolist()]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    engine.add_request("adapted", prompts[4], params, [adapter])
    return {rid: out.token_ids for rid, out in _finish(engine).items()}


def test_decode_steps_through_the_gpu_path_give_the_cpu_engines_tokens(model):
    gen = torch.Generator().manual_seed(5)
    kv = torch.randn(2, 2, 2, 7, 16, generator=gen)  # a 7-token prefix-tuning adapter
    adapter = AdapterSegment(key="a" * 64, kind="prefix_tuning", length=7, kv=kv)
    want = _generate(_engine(model, decoder=False), adapter)
    calls: list[int] = []
    got = _generate(_engine(model, decoder=True, calls=calls), adapter)
    assert got == want
    assert all(len(t) == 12 for t in got.values())
    # Six requests decode together (bucket 8: two padding rows), then fewer as they finish;
    # the tables outgrow their first width of 4 blocks (23 + 14 + 12 positions: 13 blocks).
    assert max(calls) == 6 and len(calls) >= 11


def test_only_plain_decode_steps_take_the_gpu_path(model):
    engine = _engine(model, decoder=False)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    seq = engine.add_request("r", [5, 6, 7], params)
    engine.step()  # the prompt: three rows
    prefill = build_plan([], 4)
    assert not is_decode_step(prefill)
    out = engine.scheduler.schedule()
    assert out.plan is not None and is_decode_step(out.plan)
    assert seq.num_computed == 3


def test_a_decode_row_that_is_not_finite_fails_its_request_alone(model):
    """A sequence whose cached values overflow the next decode step (its attention output is
    beyond float32): the step's kernel writes its new keys and values as zeros and flags the
    row, the engine fails that request ("non_finite"), and every other request of the same
    steps gets the tokens it gets without it."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22]]

    def run(poison: bool) -> dict[str, object]:
        calls: list[int] = []
        engine = _engine(model, decoder=True, calls=calls)
        seqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
        engine.step()  # the three prompts
        if poison:  # every value row of request 1's own blocks, in every layer
            bs = engine.config.block_size
            slots = [b * bs + o for b in seqs[1].block_table for o in range(bs)]
            engine.runner.kv_cache[:, 1, :, slots] = 3e38
        done = _finish(engine)
        assert calls, "the decode steps went through the GPU path"
        return done

    clean, poisoned = run(False), run(True)
    assert poisoned["r1"].finish_reason == "error"
    assert poisoned["r1"].error.kind == "non_finite"
    for rid in ("r0", "r2"):
        assert poisoned[rid].token_ids == clean[rid].token_ids
        assert poisoned[rid].finish_reason == "length"


def test_groups_beyond_the_captured_slots_read_their_whole_context(model, monkeypatch):
    """Two shared prefixes in one step with a single group slot: the larger group reads its
    segment once, the other group's rows read their whole context as their own keys; both
    give the CPU engine's tokens."""
    from server.engine import cuda_decode

    monkeypatch.setattr(cuda_decode, "MAX_GROUPS", 1)
    rng = np.random.default_rng(4)
    first, second = rng.integers(3, 96, 26).tolist(), rng.integers(3, 96, 13).tolist()
    prompts = [first + [7], first + [8, 9], first + [10], second + [11], second + [12, 13]]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)

    def run(decoder: bool) -> dict[str, list[int]]:
        calls: list[int] = []
        engine = _engine(model, decoder=decoder, calls=calls)
        if decoder:
            cuda = engine.runner.cuda_decoder
            assert cuda._parts(cuda._dev, 6)["seg_lens"].numel() == 1
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        return {rid: out.token_ids for rid, out in _finish(engine).items()}

    assert run(True) == run(False)


def test_a_failing_gpu_decode_path_gives_way_to_the_general_path(model, caplog):
    """If the GPU path itself fails (say a kernel this device cannot compile), the step and
    every later one run on the general path: no request fails, the tokens are the CPU
    engine's."""
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]

    def run(engine):
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        return _finish(engine)

    want = run(_engine(model, decoder=False))
    engine = _engine(model, decoder=True, calls=[])

    def broken(plan):
        raise RuntimeError("no kernel for this device")

    engine.runner.cuda_decoder.run = broken
    got = run(engine)
    assert {k: o.token_ids for k, o in got.items()} == {k: o.token_ids for k, o in want.items()}
    assert all(o.error is None for o in got.values())
    assert engine.runner.cuda_decoder is None
    assert "decoding on the general path now" in caplog.text


def test_projection_biases_are_stacked_with_their_weights():
    """Llama with attention and MLP biases (``attention_bias``, ``mlp_bias``): the stacked
    products carry the biases; tokens and their log-probabilities are the CPU engine's."""
    config = LlamaConfig(**{**CONFIG.to_dict(), "attention_bias": True, "mlp_bias": True})
    torch.manual_seed(8)
    biased = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in biased.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3)

    def run(decoder: bool) -> dict[str, list]:
        engine = _engine(biased, decoder=decoder, calls=[])
        for i, p in enumerate([[5, 6, 7, 8, 9, 10], [11, 12, 13]]):
            engine.add_request(f"r{i}", p, params)
        return _finish(engine)

    want, got = run(False), run(True)
    for rid, out in want.items():
        assert got[rid].token_ids == out.token_ids
        for mine, theirs in zip(got[rid].logprobs, out.logprobs, strict=True):
            assert mine.token == theirs.token
            assert abs(mine.logprob - theirs.logprob) < 1e-4
            for (a, x), (b, y) in zip(mine.top, theirs.top, strict=True):
                assert a == b and abs(x - y) < 1e-4


# Windows: several decode steps at once -------------------------------------------------------


def test_windows_of_decode_steps_give_the_step_by_step_tokens(model):
    """Four decode steps at a time, each fed the token the one before chose (the shared
    prefix's group, an adapter, the tables widening mid-window): the CPU engine's tokens,
    with fewer host round trips."""
    gen = torch.Generator().manual_seed(5)
    kv = torch.randn(2, 2, 2, 7, 16, generator=gen)
    adapter = AdapterSegment(key="a" * 64, kind="prefix_tuning", length=7, kv=kv)
    want = _generate(_engine(model, decoder=False), adapter)
    windows: list[list[int]] = []
    follows: list[bool] = []
    engine = _engine(model, decoder=True, calls=[], window=4, windows=windows, follows=follows)
    assert _generate(engine, adapter) == want
    # 12 tokens each. Three requests wait a step for the shared block another computes, so
    # when the first windows start, three have 10 tokens to go and three 11: windows of 4
    # and 4, then each runs what it has left; each launched before the one before it was
    # read, fed the tokens that one left on the device.
    assert windows == [[4] * 6, [4] * 6, [2, 2, 2, 3, 3, 3]]
    assert follows == [False, True, True]
    assert engine.stats.generated_tokens == 6 * 12


def _stopping_params(reference: dict[str, RequestOutput]) -> dict[str, SamplingParams]:
    """Stops that fall inside a window of four, chosen from a run without them: a stop token
    (its first appearance at output index 5), a stop string spanning tokens 5 and 6, a
    max_tokens of 6, and a min_tokens of 3 (no window before it is reached) with a stop
    token at index 3."""

    def first_new(ids: list[int], at: int) -> int:
        return next(j for j in range(at, len(ids)) if ids[j] not in ids[:j])

    r0, r1, r3 = (reference[k].token_ids for k in ("r0", "r1", "r3"))
    base = dict(max_tokens=12, temperature=0, ignore_eos=True)
    return {
        "r0": SamplingParams(**base, stop_token_ids=(r0[first_new(r0, 5)],)),
        "r1": SamplingParams(**base, stop=(f"{r1[5]} {r1[6]}",)),
        "r2": SamplingParams(**{**base, "max_tokens": 6}),
        "r3": SamplingParams(**base, min_tokens=3, stop_token_ids=(r3[first_new(r3, 3)],)),
        "r4": SamplingParams(**base),
    }


def test_stops_inside_a_window_keep_nothing_computed_after_them(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [17, 18, 19], [20, 21, 22, 23]]
    prompts.append([24, 25, 26, 27, 28, 29])

    def run(engine, params) -> dict[str, RequestOutput]:
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params[f"r{i}"])
        return _finish(engine)

    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    params = _stopping_params(
        run(_engine(model, decoder=False), dict.fromkeys([f"r{i}" for i in range(5)], plain))
    )
    reference = _engine(model, decoder=False)
    want = run(reference, params)
    windows: list[list[int]] = []
    engine = _engine(model, decoder=True, calls=[], window=4, windows=windows)
    got = run(engine, params)
    assert windows, "decode steps ran in windows"
    for rid, out in want.items():
        assert (got[rid].token_ids, got[rid].text, got[rid].finish_reason) == (
            out.token_ids,
            out.text,
            out.finish_reason,
        ), rid
    stopped = {rid: len(o.token_ids) for rid, o in want.items() if o.finish_reason == "stop"}
    assert set(stopped) == {"r0", "r1", "r3"} and len(want["r2"].token_ids) == 6
    # Positions computed past a stop are given back: the pools end the same, and no window
    # is left on the device.
    assert engine._inflight is None
    assert engine.pool.num_free == reference.pool.num_free
    assert engine.tree.num_cached_blocks == reference.tree.num_cached_blocks


def test_a_row_that_turns_non_finite_inside_a_window_fails_alone(model):
    """Token T's embedding is NaN: the step fed T (inside a window, for r1) writes a key that
    is not finite, so r1 fails there, keeping the tokens up to T; the others go on. The CPU
    engine on the same model decides the same."""
    import copy

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[40, 41, 42], [50, 51, 52, 53, 54], [60, 61, 62, 63]]

    def run(m, decoder: bool, windows=None) -> dict[str, RequestOutput]:
        engine = _engine(m, decoder=decoder, calls=[], window=4, windows=windows)
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        return _finish(engine)

    clean = run(model, decoder=False)
    r0, r1, r2 = (clean[r].token_ids for r in ("r0", "r1", "r2"))
    # r1's first token from its third on that nobody is fed before (the last is never fed)
    at = next(j for j in range(2, 7) if r1[j] not in r1[:j] + r0[:-1] + r2[:-1])
    poison = r1[at]
    poisoned = copy.deepcopy(model)
    with torch.no_grad():
        poisoned.get_input_embeddings().weight[poison] = float("nan")
    want = run(poisoned, decoder=False)
    windows: list[list[int]] = []
    got = run(poisoned, decoder=True, windows=windows)
    assert windows
    assert got["r1"].finish_reason == "error" and got["r1"].error.kind == "non_finite"
    assert got["r1"].token_ids == r1[: at + 1] == want["r1"].token_ids
    for rid in ("r0", "r2"):
        assert got[rid].token_ids == want[rid].token_ids == clean[rid].token_ids
        assert got[rid].finish_reason == "length"


def test_steps_go_one_at_a_time_without_free_blocks_or_with_logprobs_or_sampling(
    model, monkeypatch
):
    """No window when a request wants logprobs or samples, or when the blocks the window
    would write are not free: ordinary steps, the CPU engine's tokens."""
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    cases = [
        (greedy, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)),
        (greedy, SamplingParams(max_tokens=6, temperature=0.7, seed=3, ignore_eos=True)),
        (greedy, greedy),
    ]

    def run(engine, pair):
        for i, (p, sp) in enumerate(zip(prompts, pair, strict=True)):
            engine.add_request(f"r{i}", p, sp)
        return {k: o.token_ids for k, o in _finish(engine).items()}

    for index, pair in enumerate(cases):
        windows: list[list[int]] = []
        calls: list[int] = []
        engine = _engine(model, decoder=True, calls=calls, window=4, windows=windows)
        if index == 2:
            monkeypatch.setattr(engine.scheduler, "reserve_ahead", lambda ends: False)
        assert run(engine, pair) == run(_engine(model, decoder=False), pair)
        assert windows == [] and len(calls) >= 5


def test_a_step_run_more_often_than_a_window_stays_within_its_buffers(model):
    """Timing runs replay one step many times without new input: the step index stops at
    the window's last row (an index past it would be a device-side assert on CUDA)."""
    engine = _engine(model, decoder=True, calls=[], window=2)
    cuda = engine.runner.cuda_decoder
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine.add_request("r", [5, 6, 7], params)
    engine.step()
    out = engine.scheduler.schedule()
    cuda.run(out.plan)
    with torch.inference_mode():
        for _ in range(5):
            cuda._forward(cuda.bucket(1))
    assert int(cuda._views(1)["step"][0]) == 2


def test_an_abort_or_an_arrival_between_windows_on_the_device(model):
    """A window runs on the device while the host settles the one before. An abort between
    steps: the aborted request's row of the window in flight is passed over, its blocks go
    back, the others' tokens are unchanged. An arrival: no window follows until it is
    admitted (the next step settles the one in flight, then schedules). Tokens equal the CPU
    engine's."""
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    prompts = [[40, 41, 42], [50, 51, 52, 53, 54], [60, 61, 62, 63]]
    late = [70, 71, 72, 73, 74, 75]
    want = {}
    reference = _engine(model, decoder=False)
    for i, p in enumerate(prompts + [late]):
        reference.add_request(f"r{i}", p, params)
    want = {k: o.token_ids for k, o in _finish(reference).items()}

    follows: list[bool] = []
    engine = _engine(model, decoder=True, calls=[], window=4, follows=follows)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    engine.step()  # the prompts: one token each
    engine.step()  # a window launched, the next launched behind it, the first settled
    assert follows == [False, True] and engine._inflight is not None
    engine.abort("r1")
    engine.add_request("r3", late, params)
    outs = {o.request_id: o for o in engine.step()}  # settles the window in flight only
    assert set(outs) == {"r0", "r2"} and len(outs["r0"].token_ids) == 9
    assert engine._inflight is None and follows == [False, True]
    got = _finish(engine)
    assert {k: o.token_ids for k, o in got.items()} == {k: want[k] for k in ("r0", "r2", "r3")}
    # Every block not cached by the tree is free again.
    pool, tree = engine.pool, engine.tree
    assert pool.num_free == engine.runner.num_blocks - tree.num_cached_blocks


def test_a_window_launched_for_requests_that_all_stop_is_settled_before_the_engine_idles(model):
    """Every request stops inside a window while the next is already launched: the engine
    still has something unfinished (that window) until a step settles it, which reports
    nothing; then it is idle with every block not cached by the tree free."""
    prompts = [[40, 41, 42], [50, 51, 52, 53, 54]]
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    reference = _engine(model, decoder=False)
    for i, p in enumerate(prompts):
        reference.add_request(f"r{i}", p, plain)
    want = {k: o.token_ids for k, o in _finish(reference).items()}
    follows: list[bool] = []
    engine = _engine(model, decoder=True, calls=[], window=4, follows=follows)
    kept = []
    for i, p in enumerate(prompts):  # each stops at a token of the first window (1..4)
        ids = want[f"r{i}"]
        at = next(j for j in range(1, 12) if ids[j] not in ids[:j])
        assert at <= 4
        kept.append(ids[: at + 1])
        params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(ids[at],))
        engine.add_request(f"r{i}", p, params)
    engine.step()  # the prompts
    outs = engine.step()  # the first window settled, the second launched behind it
    assert follows == [False, True] and all(o.finished for o in outs)
    assert [o.token_ids for o in outs] == kept
    assert engine.has_unfinished() and not engine.scheduler.has_unfinished()
    assert engine.step() == []
    assert not engine.has_unfinished() and engine._inflight is None
    assert engine.pool.num_free == engine.runner.num_blocks - engine.tree.num_cached_blocks
