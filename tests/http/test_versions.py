"""Adapter versions a client can pin (``name@N``), ``GET /v1/adapters/{name}/versions``,
``GET /v1/models/{id}``, a re-upload that changes the kind, text adapters' token counts, and
errors that name their parameter (tiny random model, real HTTP, the ``openai`` client)."""

from __future__ import annotations

import openai
import pytest
from http_helpers import TINY_ID, error_of, files_of, upload

from bench.peft_adapters import make_prefix_tuning

V1 = "You are a pirate. Answer like one. "
V2 = "You are a careful librarian who whispers. "
PROMPT = "Where is the treasure?"


@pytest.fixture
def server(make_server, tiny_llm):
    return make_server(tiny_llm)


def greedy(client, model: str) -> tuple[str, int]:
    out = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    return out.choices[0].text, out.usage.prompt_tokens


def test_pinned_versions_serve_their_own_content(server, tiny_llm):
    tok = tiny_llm.tokenizer
    count = [len(tok.encode(t, add_special_tokens=False)) for t in (V1, V2)]
    prompt_len = len(tok.encode(PROMPT))
    client = server.openai()
    with server.http() as http:
        first = http.post("/v1/adapters", json={"name": "persona", "text": V1}).json()
        assert (first["version"], first["num_virtual_tokens"]) == (1, count[0])
        assert "replaced_kind" not in first
        v1 = greedy(client, "persona")
        second = http.post("/v1/adapters", json={"name": "persona", "text": V2}).json()
        assert (second["version"], second["num_virtual_tokens"]) == (2, count[1])
        assert "replaced_kind" not in second  # same kind
        versions = http.get("/v1/adapters/persona/versions")
        assert versions.status_code == 200
        assert [a["version"] for a in versions.json()["data"]] == [1, 2]
        assert versions.json()["data"][1] == second
        assert http.get("/v1/adapters/persona@1").json() == first
    assert greedy(client, "persona@1") == v1
    assert v1[1] == count[0] + prompt_len
    assert greedy(client, "persona") == greedy(client, "persona@2")
    assert greedy(client, "persona@2")[1] == count[1] + prompt_len
    # Pinned in `adapters` too.
    pinned = client.completions.create(
        model=TINY_ID,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True, "adapters": ["persona@1"]},
    )
    assert (pinned.choices[0].text, pinned.usage.prompt_tokens) == v1
    for missing in ("persona@3", "persona@0", "persona@x", "persona@"):
        with pytest.raises(openai.NotFoundError) as info:
            greedy(client, missing)
        assert info.value.body["code"] == "model_not_found", missing
    # A deleted name pins nothing, and lists no versions.
    with server.http() as http:
        assert http.delete("/v1/adapters/persona").status_code == 200
        r = http.get("/v1/adapters/persona/versions")
        assert r.status_code == 404 and error_of(r)["code"] == "adapter_not_found"
    with pytest.raises(openai.NotFoundError):
        greedy(client, "persona@1")


def test_a_reupload_of_another_kind_says_so(server, tiny_ref, tmp_path):
    prefix = make_prefix_tuning(tiny_ref, tmp_path / "p", num_virtual_tokens=4, seed=1)
    with server.http() as http:
        first = upload(http, "task", **files_of(prefix))
        assert first.status_code == 201 and "replaced_kind" not in first.json()
        text = http.post("/v1/adapters", json={"name": "task", "text": V1})
        assert text.status_code == 201
        assert (text.json()["kind"], text.json()["replaced_kind"]) == ("text", "prefix_tuning")
        back = upload(http, "task", **files_of(prefix))
        assert (back.json()["version"], back.json()["replaced_kind"]) == (3, "text")


def test_models_retrieve(server, tiny_llm):
    client = server.openai()
    base = client.models.retrieve(TINY_ID)
    assert (base.id, base.owned_by, base.parent) == (TINY_ID, "prefix-serve", None)
    with server.http() as http:
        record = http.post("/v1/adapters", json={"name": "persona", "text": V1}).json()
    one = client.models.retrieve("persona")
    assert (one.id, one.owned_by, one.parent, one.created) == (
        "persona",
        "acme",
        TINY_ID,
        record["created"],
    )
    assert client.models.retrieve("persona@1").id == "persona@1"
    listed = {m.id: m for m in client.models.list().data}
    assert listed["persona"] == one and listed[TINY_ID] == base
    for missing in ("nothing", "persona@2"):
        with pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve(missing)
        assert info.value.body["code"] == "model_not_found"
    # Another tenant's adapter is as missing as any.
    with pytest.raises(openai.NotFoundError):
        server.openai("globex").models.retrieve("persona")


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"tools": [{"type": "function"}]}, "tools", "tools: not supported by this server"),
        (
            {"response_format": {"type": "json_object"}},
            "response_format",
            'response_format: only {"type": "text"} is supported by this server',
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options", None),
    ],
)
def test_unsupported_chat_fields_name_their_param(server, extra, param, message):
    body = {"model": TINY_ID, "messages": [{"role": "user", "content": "x"}], **extra}
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    err = error_of(r)
    assert r.status_code == 400 and err["param"] == param, err
    assert "Value error" not in err["message"]
    if message is not None:
        assert err["message"] == message
