"""The official `openai` client against a real server with the real default model."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import MODEL_NAME, Server

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.user_key, max_retries=0)


def test_chat(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.model == MODEL_NAME
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_is_deterministic_at_temperature_zero_and_with_a_seed(client: openai.OpenAI) -> None:
    def ask(**kw: object) -> str:
        return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=24, **kw).choices[0].message.content

    assert ask(temperature=0) == ask(temperature=0)
    assert ask(temperature=1.0, seed=42) == ask(temperature=1.0, seed=42)


def test_streaming_chat_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text.strip()
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens >= 1
    nonstream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=0)
    assert text == nonstream.choices[0].message.content


def test_stream_ends_with_done(server: Server) -> None:
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {server.user_key}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_stop_and_max_completion_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Count from 1 to 20 separated by commas."}],
        temperature=0, max_completion_tokens=40,
    )
    full = reply.choices[0].message.content
    assert len(full) > 12
    stop = full[8:11]  # likely spans a token boundary
    stopped = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Count from 1 to 20 separated by commas."}],
        temperature=0, max_completion_tokens=40, stop=[stop, "never-seen"],
    )
    assert stopped.choices[0].message.content == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Reply with a JSON object with keys name and age for a dog."}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_json_schema_output_matches_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Describe a person called Ada as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        max_tokens=200, temperature=0,
    )
    data = json.loads(reply.choices[0].message.content)
    assert set(data) == {"name", "age", "tags"}
    assert isinstance(data["name"], str) and isinstance(data["age"], int)
    assert isinstance(data["tags"], list) and all(isinstance(t, str) for t in data["tags"])


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text.strip()
    assert reply.usage.completion_tokens <= 8
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices
    )
    assert streamed == reply.choices[0].text
    batch = client.completions.create(model=MODEL_NAME, prompt=["One, two,", "Red, green,"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]


def test_embeddings_string_and_list(client: openai.OpenAI) -> None:
    one = client.embeddings.create(model=MODEL_NAME, input="The cat sat on the mat.")
    many = client.embeddings.create(model=MODEL_NAME, input=["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly tax filing deadline"])
    assert len(one.data) == 1 and len(many.data) == 3
    vecs = [d.embedding for d in many.data]
    assert len(vecs[0]) == len(one.data[0].embedding) > 100
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    assert abs(dot(vecs[0], vecs[0]) - 1) < 1e-3
    assert dot(vecs[0], one.data[0].embedding) > 0.999
    assert dot(vecs[0], vecs[1]) > dot(vecs[0], vecs[2])
    # the client asks for base64 by default; plain floats work too
    raw = httpx.post(
        client.base_url.join("embeddings").__str__(), json={"model": MODEL_NAME, "input": "hi", "encoding_format": "float"},
        headers={"Authorization": f"Bearer {client.api_key}"},
    ).json()
    assert isinstance(raw["data"][0]["embedding"][0], float)


def test_list_models_only_shows_allowed_models(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    admin = openai.OpenAI(base_url=server.base_url, api_key=server.admin_key, max_retries=0)
    created = httpx.post(server.url + "/admin/keys", json={"name": "limited", "role": "user", "models": ["other-model"]},
                         headers={"Authorization": f"Bearer {server.admin_key}"}).json()
    limited = openai.OpenAI(base_url=server.base_url, api_key=created["key"], max_retries=0)
    assert [m.id for m in limited.models.list()] == []
    with pytest.raises(openai.NotFoundError):
        limited.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
    assert [m.id for m in admin.models.list()] == [MODEL_NAME]


def test_responses_carry_request_id_and_model_headers(server: Server) -> None:
    r = httpx.post(server.base_url + "/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2},
                   headers={"Authorization": f"Bearer {server.user_key}", "x-request-id": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"
    assert r.headers["x-appliance-model"] == MODEL_NAME
    assert len(httpx.get(server.url + "/healthz").headers["x-request-id"]) == 24


def test_health_readiness_and_openapi(server: Server) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == {MODEL_NAME: True}
    assert httpx.get(server.url + "/schema/openapi.json").status_code == 401
    doc = httpx.get(server.url + "/schema/openapi.json", headers={"Authorization": f"Bearer {server.user_key}"}).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/admin/keys"} <= set(doc["paths"])
