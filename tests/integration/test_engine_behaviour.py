"""Engine behaviour on the real default model: stop strings, stop tokens, EOS, max_tokens,
min_tokens, seeded sampling, preemption under a tiny KV pool, another tenant's request served
while a long prompt is computed, and the errors a request or an
adapter directory can raise (with nothing left behind in the engine or the adapter table).

Expected tokens come from the model's own greedy runs (module fixtures), so the assertions are
exact without hard-coding token ids; the prompts were picked for a known continuation
(" girl named Emma who ...", and "No." + EOS for a yes/no chat question).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from adapters_store.formats import AdapterError
from bench.peft_adapters import make_prefix_tuning
from server import LLM, SamplingParams
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.model_runner import kv_bytes_per_token
from server.engine.request import InvalidRequest

STORY = "Once upon a time, there was a little"  # greedy: " girl named Emma who loved to ..."
GREEDY = SamplingParams(max_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def llm(model_dir, data_dir):
    return LLM(str(model_dir), data_dir=data_dir, device="cpu", dtype="float32")


@pytest.fixture(autouse=True)
def no_leftovers(llm):
    """Abort whatever a failing test left in the shared engine, so failures stay independent
    (a request left queued would run inside every later generate call)."""
    yield
    for request_id in list(llm.engine.seqs):
        llm.engine.abort(request_id)


@pytest.fixture(scope="module")
def story(llm) -> list[int]:
    """The greedy continuation of STORY (6 tokens; no EOS among them)."""
    out = llm.generate(STORY, GREEDY, use_tqdm=False)[0]
    assert out.text.startswith(" girl named Emma who"), out.text
    assert out.finish_reason == "length"
    return out.token_ids


@pytest.fixture(scope="module")
def yes_no(llm) -> tuple[str, list[int]]:
    """A chat prompt the model answers in a few tokens, then EOS: ("No.", EOS)."""
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in llm.engine.eos_ids
    assert 2 <= len(out.token_ids) <= 5, out.token_ids
    return prompt, out.token_ids


def assert_engine_idle(engine: LLMEngine) -> None:
    """No request left, and every block either free or held by the prefix tree alone (which
    can then give every one of them back)."""
    assert not engine.has_unfinished()
    assert engine.seqs == {}
    pool, tree = engine.pool, engine.tree
    held = [b for b in range(pool.num_blocks) if pool.refcount(b) > 0]
    assert all(pool.refcount(b) == 1 for b in held)
    assert len(held) == tree.num_cached_blocks == tree.num_evictable_blocks()
    tree.evict(tree.num_cached_blocks)
    assert pool.num_free == pool.num_blocks


# Stopping -------------------------------------------------------------------------------


def test_stop_strings_cut_the_text_before_the_stop(llm, story):
    decode = llm.tokenizer.decode
    cases = [
        (("Emma",), " girl named ", 3),
        (("d Em",), " girl name", 3),  # spans two tokens: stops at the token completing it
        (("loved", "named"), " girl ", 2),  # the earliest in the text wins, not the first given
        (("time",), decode(story), 6),  # only generated text is searched, not the prompt
    ]
    params = [SamplingParams(max_tokens=6, temperature=0, stop=stop) for stop, _, _ in cases]
    outs = llm.generate([STORY] * len(cases), params, use_tqdm=False)
    for (stop, text, n), out in zip(cases, outs, strict=True):
        assert out.text == text, stop
        assert out.token_ids == story[:n], stop
        assert out.finish_reason == ("length" if n == 6 else "stop"), stop


def test_stop_token_ids_and_max_tokens(llm, story):
    params = [
        SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(story[3],)),
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=4, temperature=0),
    ]
    stop_tok, one, four = llm.generate([STORY] * 3, params, use_tqdm=False)
    # The stop token is kept in the output (as vLLM does for a non-special token).
    assert (stop_tok.token_ids, stop_tok.finish_reason) == (story[:4], "stop")
    assert stop_tok.text == llm.tokenizer.decode(story[:4])
    assert (one.token_ids, one.finish_reason, one.text) == (story[:1], "length", " girl")
    assert (four.token_ids, four.finish_reason) == (story[:4], "length")
    assert four.text == llm.tokenizer.decode(story[:4])


def test_eos_stops_unless_ignore_eos(llm, yes_no):
    prompt, answer = yes_no
    eos = answer[-1]
    params = [
        SamplingParams(max_tokens=8, temperature=0),
        SamplingParams(max_tokens=len(answer) + 3, temperature=0, ignore_eos=True),
    ]
    stopped, ignored = llm.generate([prompt, prompt], params, use_tqdm=False)
    assert (stopped.token_ids, stopped.finish_reason) == (answer, "stop")
    assert stopped.text == llm.tokenizer.decode(answer[:-1]) == "No."  # EOS not in the text
    assert ignored.finish_reason == "length"
    assert len(ignored.token_ids) == len(answer) + 3
    assert ignored.token_ids[: len(answer)] == answer
    assert ignored.token_ids[len(answer) - 1] == eos


def test_min_tokens_holds_back_eos_and_stop_tokens(llm, yes_no):
    prompt, answer = yes_no  # "No." then EOS
    period = answer[-2]
    params = [
        SamplingParams(max_tokens=len(answer) + 3, min_tokens=len(answer) + 2, temperature=0),
        SamplingParams(max_tokens=6, min_tokens=2, stop_token_ids=(period,), temperature=0),
    ]
    late_eos, late_stop = llm.generate([prompt, prompt], params, use_tqdm=False)
    n = len(answer) + 2
    assert late_eos.token_ids[: len(answer) - 1] == answer[:-1]
    assert len(late_eos.token_ids) >= n
    assert not set(late_eos.token_ids[:n]) & set(llm.engine.eos_ids)
    # The period was the greedy second token; it is banned there, so the answer differs.
    assert late_stop.token_ids[0] == answer[0]
    assert late_stop.token_ids[1] != period


def test_min_tokens_is_not_undone_by_an_earlier_stop_string(llm, story):
    """ "Emma" ends the 3rd token, before min_tokens=5 is reached. The output must still hold
    at least min_tokens tokens of text (vLLM only looks for stop strings in text generated
    after min_tokens), not be cut back to " girl named "."""
    params = SamplingParams(max_tokens=6, min_tokens=5, stop=("Emma",), temperature=0)
    out = llm.generate(STORY, params, use_tqdm=False)[0]
    assert out.token_ids[:5] == story[:5]
    assert out.text.startswith(llm.tokenizer.decode(story[:5]))


# Sampling -------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_across_calls_and_batches(llm, story):
    seeded = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=1234)
    first = llm.generate(STORY, seeded, use_tqdm=False)[0]
    second = llm.generate(STORY, seeded, use_tqdm=False)[0]
    assert second.token_ids == first.token_ids
    other_seed = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=99)
    batch = llm.generate(
        ["The capital of France is", STORY, STORY, "1, 2, 3,"],
        [GREEDY, other_seed, seeded, SamplingParams(max_tokens=3, temperature=1.0)],
        use_tqdm=False,
    )
    assert batch[2].token_ids == first.token_ids
    assert batch[1].token_ids != first.token_ids
    # Sampled, not greedy: temperature 0.9 leaves the greedy path within 8 tokens here.
    assert first.token_ids[:6] != story


# Preemption -----------------------------------------------------------------------------

PREEMPT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "1, 2, 3, 4, 5,",
    "The days of the week are Monday,",
    "My favourite food is pizza and",
    "In 1850 the city of Hamburg",
]


def test_preemption_gives_the_same_tokens_as_a_roomy_pool(llm, model_dir, data_dir):
    # 7 blocks of 8 positions. The 6 requests (5-14 prompt tokens + 10 new) need 2-3 blocks
    # each, 16 in all, so running ones are preempted and recomputed.
    block_size, num_blocks, new = 8, 7, 10
    per_block = kv_bytes_per_token(llm.engine.runner.model.config, torch.float32) * block_size
    tiny = LLM(
        str(model_dir),
        data_dir=data_dir,
        device="cpu",
        dtype="float32",
        engine_config=EngineConfig(block_size=block_size, kv_cache_memory=num_blocks * per_block),
    )
    assert tiny.engine.pool.num_blocks == num_blocks
    prompts = [llm.tokenizer.encode(p) for p in PREEMPT_PROMPTS]
    assert sum(-(-(len(p) + new) // block_size) for p in prompts) == 16
    params = [SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)] * 4 + [
        SamplingParams(max_tokens=new, temperature=0.8, seed=s, ignore_eos=True) for s in (1, 2)
    ]
    got = tiny.generate(prompts, params, use_tqdm=False)
    assert tiny.engine.scheduler.num_preemptions > 0
    want = llm.generate(prompts, params, use_tqdm=False)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.finish_reason == w.finish_reason == "length"
    assert_engine_idle(tiny.engine)
    assert_engine_idle(llm.engine)

    # The context is capped by the pool: 7 * 8 = 56 positions, max_tokens included.
    assert tiny.engine.max_model_len == 56
    tiny.engine.add_request("edge", list(range(100, 150)), SamplingParams(max_tokens=6))
    assert tiny.engine.abort("edge")
    with pytest.raises(InvalidRequest) as info:
        tiny.generate([list(range(100, 150))], SamplingParams(max_tokens=7), use_tqdm=False)
    assert info.value.param == "max_tokens"
    assert_engine_idle(tiny.engine)


# Errors ---------------------------------------------------------------------------------


def test_another_tenants_request_is_done_while_a_long_prompt_is_computed(
    llm, model_dir, data_dir, story
):
    """A 64-token budget; globex's 300-token prompt is queued first, acme's story prompt right
    after. acme is seated the next step and its 6 greedy tokens are all out before globex's
    first (before, acme was admitted only in the step globex's prompt ended, so it finished
    after); both outputs equal their solo greedy runs on a roomy engine."""
    small = LLM(
        str(model_dir),
        data_dir=data_dir,
        device="cpu",
        dtype="float32",
        engine_config=EngineConfig(max_num_batched_tokens=64),
    )
    long_prompt = (llm.tokenizer.encode(STORY + " girl named Emma.") * 30)[:300]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = llm.generate(long_prompt, params, use_tqdm=False)[0].token_ids
    engine = small.engine
    engine.add_request("long", long_prompt, params, tenant="globex")
    engine.add_request("short", llm.tokenizer.encode(STORY), params, tenant="acme")
    first_token: dict[str, int] = {}
    done: dict[str, tuple[int, list[int]]] = {}
    step = 0
    while engine.has_unfinished():
        step += 1
        for out in engine.step():
            if out.token_ids:
                first_token.setdefault(out.request_id, step)
            if out.finished:
                done[out.request_id] = (step, out.token_ids)
    assert done["short"][1] == story and done["long"][1] == alone
    assert done["short"][0] < first_token["long"], (done, first_token)
    assert engine.scheduler.num_preemptions == 0
    assert_engine_idle(engine)


def test_a_request_longer_than_the_context_is_invalid(llm):
    engine = llm.engine
    assert engine.max_model_len == 8192  # the model's, smaller than the 1 GiB pool's
    prompt = llm.tokenizer.encode(STORY)
    fits = SamplingParams(max_tokens=engine.max_model_len - len(prompt))
    engine.add_request("edge", prompt, fits)
    assert engine.abort("edge")
    with pytest.raises(InvalidRequest) as info:
        llm.generate(prompt, SamplingParams(max_tokens=fits.max_tokens + 1), use_tqdm=False)
    assert info.value.param == "max_tokens"
    assert "exceeds the context of 8192" in str(info.value)
    assert_engine_idle(engine)


def test_unknown_adapter_is_invalid(llm):
    with pytest.raises(InvalidRequest) as info:
        llm.generate(STORY, GREEDY, adapters=[["no-such-adapter"]], use_tqdm=False)
    assert info.value.param == "adapters"
    assert "'no-such-adapter'" in str(info.value)
    assert_engine_idle(llm.engine)


@pytest.mark.parametrize(
    ("second", "param"),
    [
        ((STORY, SamplingParams(max_tokens=9000), []), "max_tokens"),
        ((STORY, GREEDY, ["no-such-adapter"]), "adapters"),
    ],
)
def test_a_rejected_batch_leaves_no_request_behind(llm, second, param):
    """generate() of [good, bad] raises for the bad one; the good one, already queued, must not
    stay in the engine (it would run unseen inside every later generate call)."""
    prompts, params, adapters = zip((STORY, GREEDY, []), second, strict=True)
    with pytest.raises(InvalidRequest) as info:
        llm.generate(list(prompts), list(params), adapters=list(adapters), use_tqdm=False)
    assert info.value.param == param
    assert llm.engine.seqs == {}
    assert not llm.engine.has_unfinished()


def tiny_llama() -> LlamaForCausalLM:
    """A 2-layer random Llama, the base of adapters made for another model."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def test_bad_adapter_directories_raise_and_change_nothing(llm, tmp_path):
    llm.add_text_adapter("keeper", "You are terse.")
    other_model = make_prefix_tuning(tiny_llama(), tmp_path / "other", num_virtual_tokens=4)
    lora = tmp_path / "lora"
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"])
    get_peft_model(tiny_llama(), config).save_pretrained(str(lora))
    cases = [
        (lora, "peft_type", "LoRA"),
        (other_model, "num_layers", "num_layers"),  # made for a 2-layer model
        (tmp_path / "missing", "config", "is not a directory"),
    ]
    before = dict(llm.adapters)
    for path, param, words in cases:
        for name in ("new-one", "keeper"):  # a new name, and replacing an existing one
            with pytest.raises(AdapterError) as info:
                llm.add_adapter(name, path)
            assert info.value.param == param, path
            assert words in str(info.value), path
            assert llm.adapters == before
    assert llm.adapters["keeper"].token_ids == tuple(
        llm.tokenizer.encode("You are terse.", add_special_tokens=False)
    )
