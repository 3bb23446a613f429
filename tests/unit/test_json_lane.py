"""JSON bodies: what ``server.json_parse`` accepts and refuses (against ``json.loads`` and hand
counts), and the parser process of ``JsonLane`` (a real ``python -m server.json_worker``):
the same answers as parsing in place, a fresh process after a death, a timeout or a caller
that gave up, 429 past its queue, and the event loop free while it parses."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from server.api.errors import APIError
from server.api.json_body import INLINE_VALUES, JsonLane, load_json, read_json
from server.json_parse import MAX_CONTAINERS, MAX_DEPTH, MAX_VALUES, BodyError, parse


def _refusal(call, *args) -> tuple[int, str, str | None, str | None]:
    with pytest.raises(APIError) as info:
        call(*args)
    e = info.value
    return e.status, e.message, e.code, e.param


def _lane_refusal(lane: JsonLane, raw: bytes) -> tuple[int, str, str | None, str | None]:
    async def go():
        try:
            await lane.parse(raw, "acme")
        except APIError as e:
            return e.status, e.message, e.code, e.param
        raise AssertionError("not refused")

    return asyncio.run(go())


# Bodies on both sides of INLINE_VALUES, of every shape a client can send.
BODIES = {
    "few values": {"model": "m", "prompt": "Hello, world", "max_tokens": 4},
    "token ids, inline": {"model": "m", "prompt": list(range(INLINE_VALUES // 2))},
    "token ids, lane": {"model": "m", "prompt": [i % 49152 for i in range(3 * INLINE_VALUES)]},
    "64 prompts of 8192 ids": {"model": "m", "prompt": [[5] * 8192 for _ in range(64)]},
    "chat parts": {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a,b"}] * 4000}],
    },
    "commas in text": {"model": "m", "prompt": "a, " * (2 * INLINE_VALUES)},
    "unicode": {"model": "m", "prompt": ["é, 日本, 🙂"] * INLINE_VALUES},
    "floats and nulls": {"model": "m", "logit_bias": {str(i): -0.5 for i in range(50_000)}},
}


@pytest.mark.parametrize("name", list(BODIES))
def test_in_place_and_in_the_lane_equal_json_loads(name):
    raw = json.dumps(BODIES[name]).encode()
    expected = json.loads(raw)
    assert load_json(raw) == expected

    async def go():
        lane = JsonLane()
        try:
            return await read_json(lane, raw, "acme"), await lane.parse(raw, "acme"), lane.started
        finally:
            await lane.close()

    via_read, via_lane, started = asyncio.run(go())
    assert via_read == expected and via_lane == expected
    assert started == 1


def _values(k: int) -> bytes:
    """A body of exactly ``k`` JSON values (the object, "model" and its string, the list, and
    ``k - 3`` zeros in it) in 2 arrays and objects."""
    return json.dumps({"model": "m", "prompt": [0] * (k - 3)}).encode()


def test_values_and_containers_are_bounded_exactly():
    assert len(parse(_values(MAX_VALUES))["prompt"]) == MAX_VALUES - 3
    with pytest.raises(BodyError) as info:
        parse(_values(MAX_VALUES + 1))
    assert (info.value.param, info.value.code) == ("prompt", "invalid_request")
    assert f"more than {MAX_VALUES} JSON values" in info.value.message
    # The object and the list, then MAX_CONTAINERS - 2 empty objects: exactly at the limit.
    at = json.dumps({"messages": [{}] * (MAX_CONTAINERS - 2)}).encode()
    assert len(parse(at)["messages"]) == MAX_CONTAINERS - 2
    over = json.dumps({"model": "m", "stop": "x", "metadata": [[]] * (MAX_CONTAINERS - 1)})
    with pytest.raises(BodyError) as info:
        parse(over.encode())
    assert info.value.param == "metadata"
    # A top-level array has no field to name.
    with pytest.raises(BodyError) as info:
        parse(json.dumps([[0]] * MAX_CONTAINERS).encode())
    assert info.value.param is None


# Refusals that must read the same wherever the body was parsed; each is padded with a field
# of many commas so that read_json sends it to the lane.
PAD = ', "pad": "' + "," * (2 * INLINE_VALUES) + '"'
REFUSED = {
    "not JSON": b'{"model": "m", "prompt": [1, 2' + PAD.encode(),
    "too deep": (
        '{"model": "m"' + PAD + ', "prompt": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}"
    ).encode(),
    "lone surrogate escape": ('{"model": "m"' + PAD + ', "user": "\\ud800x"}').encode(),
    "raw surrogate bytes": b'{"model": "m"' + PAD.encode() + b', "user": "\xed\xa0\x80"}',
    "too many values": _values(MAX_VALUES + 1),
    "not UTF-8": b'{"model": "\xff"' + PAD.encode() + b"}",
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refusals_are_the_same_in_place_and_in_the_lane(name):
    raw = REFUSED[name]
    in_place = _refusal(load_json, raw)
    assert in_place[0] == 400
    lane = JsonLane()
    assert _lane_refusal(lane, raw) == in_place
    assert {
        "not JSON": (None, "invalid_json"),
        "too deep": ("prompt", "invalid_json"),
        "lone surrogate escape": ("user", "invalid_request"),
        "raw surrogate bytes": ("user", "invalid_request"),
        "too many values": ("prompt", "invalid_request"),
        "not UTF-8": (None, "invalid_json"),
    }[name] == (in_place[3], in_place[2])


BIG = json.dumps({"model": "m", "prompt": [[7]] * 2_000_000}).encode()  # ~0.6 s to parse
OK = json.dumps({"model": "m", "prompt": [3] * (2 * INLINE_VALUES)}).encode()


def test_a_dead_process_is_replaced_and_its_body_tried_again():
    async def go():
        lane = JsonLane()
        try:
            first = await lane.parse(OK, "acme")
            lane._process.kill()  # died idle: the next body must not pay for it
            await lane._process.wait()
            second = await lane.parse(OK, "acme")
            return first, second, lane.started
        finally:
            await lane.close()

    first, second, started = asyncio.run(go())
    assert first == second == json.loads(OK)
    assert started == 2


def test_a_timeout_kills_the_process_and_answers_503():
    async def go():
        lane = JsonLane(timeout=0.05)
        try:
            try:
                await lane.parse(BIG, "acme")
            except APIError as e:
                refused = (e.status, e.code, e.retry_after)
            lane.timeout = 30.0
            return refused, await lane.parse(OK, "acme"), lane.started
        finally:
            await lane.close()

    refused, after, started = asyncio.run(go())
    assert refused == (503, "parser_unavailable", 1)
    assert after == json.loads(OK)
    assert started == 3  # the body's two tries, then a fresh process for the next body


def test_a_caller_that_gives_up_leaves_the_lane_in_step():
    async def go():
        lane = JsonLane()
        try:
            task = asyncio.create_task(lane.parse(BIG, "acme"))
            await asyncio.sleep(0.2)  # written, not yet answered
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await lane.parse(OK, "acme"), lane.started
        finally:
            await lane.close()

    after, started = asyncio.run(go())
    assert after == json.loads(OK)  # not the abandoned body's answer
    assert started == 2


def test_past_its_queue_the_lane_answers_429():
    """Four waiting at most here, two of them one tenant's: a tenant that floods the lane gets
    429s while the others' bodies still get in, until the lane as a whole is full."""

    async def go():
        lane = JsonLane(waiting=4, per_tenant=2)
        try:
            bodies = ["acme"] * 3 + ["globex"] * 2 + ["initech"] * 2
            return await asyncio.gather(
                *(lane.parse(OK, t) for t in bodies), return_exceptions=True
            )
        finally:
            await lane.close()

    answers = asyncio.run(go())
    parsed = json.loads(OK)
    refused = [(a.status, a.code, a.retry_after, a.message) for a in answers if a != parsed]
    # acme's third is over its share; initech's two find the lane full (acme 2 + globex 2).
    assert [a == parsed for a in answers] == [True, True, False, True, True, False, False]
    assert refused == [
        (429, "too_many_large_bodies", 1, msg)
        for msg in [
            "2 of this tenant's large request bodies are waiting to be parsed; retry shortly",
            "4 large request bodies are waiting to be parsed; retry shortly",
            "4 large request bodies are waiting to be parsed; retry shortly",
        ]
    ]


def test_the_event_loop_runs_while_the_lane_parses():
    """A ticker on the same loop records its gaps while a body of four million values is
    parsed (and refused) in the lane; parsed in place, the same body holds the loop for the
    whole parse."""

    async def go():
        lane = JsonLane()
        await lane.parse(OK, "acme")  # the process is started: its start is not measured
        gaps: list[float] = []
        done = asyncio.Event()

        async def tick():
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        start = time.perf_counter()
        try:
            await read_json(lane, BIG, "acme")
        except APIError as e:
            refused = (e.status, e.param)
        took = time.perf_counter() - start
        done.set()
        await ticker
        await lane.close()
        return refused, took, max(gaps)

    refused, took, worst_gap = asyncio.run(go())
    assert refused == (400, "prompt")
    in_place = time.perf_counter()
    with pytest.raises(APIError):
        load_json(BIG)
    in_place = time.perf_counter() - in_place
    # The lane's parse took as long as the one in place, but the loop waited at most for
    # loading the (small) answer back.
    assert worst_gap < 0.1 < in_place, (worst_gap, took, in_place)
