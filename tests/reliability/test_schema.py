"""Schemathesis against the server's own OpenAPI document (``GET /openapi.json``): for every
operation, requests derived from the schema go over HTTP to a real server on the tiny model,
in two phases: schemathesis' coverage phase (boundary values, missing and wrong-typed fields,
unexpected methods and content types: deterministic) and fuzzing (hypothesis-generated requests,
valid by the schema and invalid: hostile input). Each request carries acme's key, another
tenant's (globex), none or an unknown one. Every answer is checked: no 5xx, a declared status, a
declared media type, a body matching the declared schema (each event of a stream included) and
the declared headers (``X-Request-ID``; ``Retry-After`` on 429 and 503). A secured operation
called without a valid key must answer 401.

Requests are steered so that they reach the engine and the store, not only the validators: a
generation request's ``model`` is often the base model or an existing text adapter, an adapter
path often names an existing one, an upload often carries a real PEFT adapter (files or a .zip).
Generation stays small: ``max_tokens`` at most ``MAX_TOKENS``.

Fast (``make test``): ``EXAMPLES`` fuzzed requests per operation and mode. Full (``make
reliability``): more, and a random hypothesis seed. Failures are collected, not raised at the
first, so that the figures cover the whole run; the test then fails listing each.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from http_helpers import KEYS, TINY_ID, files_of, peft_entries, zip_of
from hypothesis import strategies as st
from report import FULL, record, scale
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bench.peft_adapters import make_prefix_tuning, make_prompt_tuning

EXAMPLES = scale(25, 1000)  # fuzzed requests per operation and generation mode (at most)
MAX_TOKENS = 4
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
TEXT_ADAPTERS = {"persona": "You are a terse pirate. ", "task": "Answer in one word. "}
# The key of each request: mostly acme's, sometimes globex's (another tenant: acme's adapters
# are not there), none, or an unknown one.
CALLERS = (*[KEYS["acme"]] * 4, KEYS["globex"], None, "not-a-key")
VALID = {f"Bearer {KEYS['acme']}", f"Bearer {KEYS['globex']}"}

Pick = Callable[[Sequence[Any], str], Any]  # chooses one of the options (label: what for)


@dataclass
class Tally:
    """What a run did and saw; ``failures`` keeps one report per distinct failure."""

    calls: Counter = field(default_factory=Counter)  # by operation
    statuses: Counter = field(default_factory=Counter)
    unauthenticated: int = 0
    streams: int = 0
    coverage_cases: int = 0
    failures: dict[str, str] = field(default_factory=dict)

    def fail(self, key: str, report: str) -> None:
        self.failures.setdefault(key, report[:3000])


@pytest.fixture(scope="module")
def peft_files(tiny_ref, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Multipart parts of real PEFT adapters for the tiny model: files, and a .zip."""
    root = tmp_path_factory.mktemp("schema-adapters")
    prefix = make_prefix_tuning(tiny_ref, root / "prefix", 4, seed=11)
    prompt = make_prompt_tuning(tiny_ref, root / "prompt", 3, seed=12)
    return {
        "files": {k: v[1] for k, v in files_of(prefix).items()},
        "archive": {"archive": zip_of(peft_entries(prompt))},
    }


@pytest.fixture
def served(make_server, tiny_llm):
    """A server on the tiny model, and its OpenAPI document read over HTTP without a key."""
    server = make_server(tiny_llm)
    with server.http(tenant=None) as http:
        document = http.get("/openapi.json")
    assert document.status_code == 200
    return server, document.json()


def test_schemathesis_every_route(served, peft_files):
    server, document = served
    assert "422" not in str(document["paths"])  # validation errors answer 400
    schema = _load(document)
    tally = Tally()
    session = requests.Session()
    session.trust_env = False
    started = time.monotonic()
    rotation = itertools.count()

    def cycle(options: Sequence[Any], _label: str) -> Any:  # the coverage phase's choices
        return options[next(rotation) % len(options)]

    with server.http() as acme:
        for result in schema.get_all_operations():
            operation = result.ok()
            _restore(acme)
            config = schema.config.generation_for(operation=operation)
            for case in schema.iter_coverage_cases(
                operation, generation_modes=list(MODES), generation_config=config
            ):
                tally.coverage_cases += 1
                _steer(case, cycle, peft_files, positive=False)
                _check(case, cycle(CALLERS, "key"), server.url, session, tally)
            for mode in MODES:
                _restore(acme)  # a DELETE may have hidden the text adapters
                _fuzz(operation, mode, server.url, session, peft_files, tally)
    seconds = time.monotonic() - started
    server_errors = sum(n for status, n in tally.statuses.items() if status >= 500)
    record(
        "schemathesis",
        f"every operation of /openapi.json ({len(tally.calls)}): schemathesis' coverage phase, "
        f"then up to {EXAMPLES} fuzzed requests per operation and mode (schema-valid, invalid), "
        "with a tenant's key, another tenant's, none or an unknown one; over HTTP, tiny model",
        "no 5xx; every status, media type, body (stream events included) and header as "
        "declared; without a valid key, 401",
        {
            "operations": len(tally.calls),
            "calls": sum(tally.calls.values()),
            "coverage cases": tally.coverage_cases,
            "streams": tally.streams,
            "unauthenticated": tally.unauthenticated,
            "statuses": " ".join(f"{s}:{n}" for s, n in sorted(tally.statuses.items())),
            "5xx": server_errors,
            "violations": len(tally.failures),
            "seconds": round(seconds, 1),
        },
    )
    assert not tally.failures, "\n\n".join(tally.failures.values())
    assert server_errors == 0
    documented = {f"{m.upper()} {path}" for path, item in document["paths"].items() for m in item}
    assert set(tally.calls) == documented and len(documented) == 15
    # The steering worked: generation, streams, uploads of real adapters and 401s all happened.
    assert tally.statuses[200] and tally.statuses[201] and tally.statuses[401]
    assert tally.streams > 0


def test_the_checks_catch_a_document_that_lies(served):
    """The harness is not vacuous: against a document that misdescribes one detail of what the
    server answers, the same checks fail."""
    server, document = served
    session = requests.Session()
    session.trust_env = False
    body = {"model": TINY_ID, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}

    def props(doc: dict, model: str) -> dict:
        return doc["components"]["schemas"][model]["properties"]

    def answers(doc: dict) -> dict:
        return doc["paths"]["/v1/completions"]["post"]["responses"]

    lies: dict[str, tuple[Callable[[dict], object], dict]] = {
        "object of a completion": (
            lambda d: props(d, "Completion").update(object={"const": "completion"}),
            body,
        ),
        "object of a chunk": (
            lambda d: props(d, "CompletionChunk").update(object={"const": "chunk"}),
            stream,
        ),
        "usage in the last event": (
            lambda d: props(d, "Usage").update(total_tokens={"type": "string"}),
            stream,
        ),
        "request id header": (
            lambda d: d["components"]["headers"]["X-Request-ID"].update(schema={"pattern": "^x"}),
            body,
        ),
        "no event stream": (
            lambda d: answers(d)["200"]["content"].pop("text/event-stream"),
            stream,
        ),
        "no 404": (lambda d: answers(d).pop("404"), {**body, "model": "nope"}),
    }
    for lie, (tell, sent) in lies.items():
        wrong = copy.deepcopy(document)
        tell(wrong)
        case = _load(wrong)["/v1/completions"]["POST"].Case(
            body=sent, media_type="application/json"
        )
        tally = Tally()
        _check(case, KEYS["acme"], server.url, session, tally)
        assert len(tally.failures) == 1, (lie, tally.failures)
    # And the true document passes the same requests.
    tally = Tally()
    operation = _load(document)["/v1/completions"]["POST"]
    for sent in (body, stream, {**body, "model": "nope"}):
        case = operation.Case(body=sent, media_type="application/json")
        _check(case, KEYS["acme"], server.url, session, tally)
    assert not tally.failures and tally.statuses == Counter({200: 2, 404: 1}) and tally.streams == 1


def _load(document: dict) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    # The key is chosen per request (CALLERS), not generated or left out by schemathesis.
    schema.config.generation.update(with_security_parameters=False)
    return schema


def _restore(acme) -> None:
    for name, text in TEXT_ADAPTERS.items():
        r = acme.post("/v1/adapters", json={"name": name, "text": text})
        assert r.status_code == 201, r.text


def _check(case, key: str | None, url: str, session, tally: Tally) -> None:
    """Send ``case`` with ``key`` and check the answer; failures go to ``tally``."""
    label = case.operation.label
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = case.call(base_url=url, session=session, headers=headers, timeout=60)
    tally.calls[label] += 1
    tally.statuses[response.status_code] += 1
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        tally.streams += 1
    # Not for the coverage phase's probes of undocumented methods: routing answers them (405).
    secured = case.method.upper() == case.operation.method.upper() and bool(
        case.operation.definition.raw.get("security")
    )
    if secured and response.request.headers.get("Authorization") not in VALID:
        tally.unauthenticated += 1
        if response.status_code != 401:
            problem = f"{label}: {response.status_code} without a valid key"
            tally.fail(problem, f"{problem}: {response.text[:300]}\n{case.as_curl_command()}")
    try:
        case.validate_response(response, checks=CHECKS, headers=headers)
    except (Failure, FailureGroup) as exc:
        inner = getattr(exc, "exceptions", None) or [exc]
        tally.fail(label + ": " + ", ".join(sorted({type(e).__name__ for e in inner})), str(exc))


def _fuzz(operation, mode, url: str, session, peft_files, tally: Tally) -> None:
    """Up to ``EXAMPLES`` generated requests to ``operation``, each checked."""

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=not FULL,
        phases=[hypothesis.Phase.generate],  # failures are collected, never shrunk
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def one(case, data) -> None:
        def pick(options: Sequence[Any], label: str) -> Any:
            return data.draw(st.sampled_from(options), label=label)

        _steer(case, pick, peft_files, positive=mode == GenerationMode.POSITIVE)
        _check(case, pick(CALLERS, "key"), url, session, tally)

    try:
        one()
    except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (no parameters)
        assert mode == GenerationMode.NEGATIVE, operation.label


def _steer(case, pick: Pick, peft_files, positive: bool) -> None:
    """Point requests at what exists (the base model, the text adapters, real PEFT files) more
    often than chance would, and keep generation short. For schema-valid requests, also meet
    what the schema states in prose (``schemas._Generation``): whole numbers written as
    integers, ``best_of`` equal to ``n``."""
    label = case.operation.label
    if "{name}" in case.operation.path and pick((True, False), "existing name"):
        case.path_parameters = {"name": pick(sorted(TEXT_ADAPTERS), "name")}
    if not isinstance(case.body, dict):
        return
    if positive:
        case.body = _whole_floats_as_ints(case.body)
    if label.endswith("completions"):
        _steer_generation(case.body, pick, positive)
    elif label == "POST /v1/adapters" and case.media_type == "multipart/form-data":
        _steer_upload(case.body, pick, peft_files)


def _steer_generation(body: dict, pick: Pick, positive: bool) -> None:
    # Hypothesis favours the first options: mostly the base model, seldom the generated name.
    model = pick([TINY_ID, *TEXT_ADAPTERS, TINY_ID, None], "model")
    if model is not None:
        body["model"] = model
    if pick((False, True), "adapters"):
        body["adapters"] = pick([["persona"], ["task", "persona"], []], "adapter names")
    limits = [k for k in ("max_tokens", "max_completion_tokens") if _is_int(body.get(k))]
    for k in limits:
        body[k] = min(body[k], MAX_TOKENS)
    if not limits:
        body["max_tokens"] = MAX_TOKENS  # a chat request would fill the context
    if _is_int(body.get("min_tokens")):
        body["min_tokens"] = min(body["min_tokens"], MAX_TOKENS)
    if positive and _is_int(body.get("best_of")):
        body["best_of"] = body.get("n", 1)


def _steer_upload(body: dict, pick: Pick, peft_files) -> None:
    """Two times in three, real PEFT files (or a real .zip) in place of the generated bytes."""
    if pick((True, False, True), "real adapter"):
        kind = "files" if {"config", "weights"} & set(body) else "archive"
        body.update(peft_files[kind])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_floats_as_ints(v) for v in value]
    return value
