"""Our OpenAI-compatible responses validate against OpenAI's own OpenAPI document (the component schemas in
tests/openai_openapi/schemas.json, extracted by the script beside it), with a JSON Schema 2020-12 validator.

Where the document is stricter than OpenAI's real responses, the test follows the behaviour and relaxes the
schema at that one place, for the reason given in RELAXED; nothing else is relaxed."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest

SCHEMAS = Path(__file__).resolve().parents[1] / "openai_openapi" / "schemas.json"
CHAT, COMPLETIONS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/models"
MODEL = "smollm2-135m-instruct"

# (schema, JSON path inside it, why OpenAI's behaviour differs from the document there). The document still
# writes some fields in OpenAPI 3.0's `nullable: true`, which JSON Schema 2020-12 ignores; OpenAI sends null there.
CHUNK_CHOICE = ("CreateChatCompletionStreamResponse", "properties", "choices", "items", "properties")
COMPLETION_CHOICE = ("CreateCompletionResponse", "properties", "choices", "items", "properties")
COMPLETION_LOGPROBS = COMPLETION_CHOICE + ("logprobs", "anyOf", 0, "properties")
RELAXED = [
    (CHUNK_CHOICE + ("finish_reason",),
     "a stream chunk's finish_reason is null until the choice's last chunk (`nullable: true` in the document)"),
    (CHUNK_CHOICE + ("logprobs",),
     "a chunk's logprobs is null when the request did not ask for them (`nullable: true` in the document)"),
    (CHUNK_CHOICE + ("logprobs", "properties", "refusal"),
     "a chunk's logprobs.refusal is null: no refusal was generated (`nullable: true` in the document)"),
    (COMPLETION_CHOICE + ("finish_reason",),
     "streamed completions use this shape too, and their finish_reason is null until the choice's last chunk, as "
     "in chat chunks (a response that is not streamed always has one: checked below)"),
    (COMPLETION_LOGPROBS + ("token_logprobs", "items"),
     "with `echo`, the prompt's first token has no log-probability (nothing precedes it): OpenAI sends null"),
    (COMPLETION_LOGPROBS + ("top_logprobs", "items"),
     "with `echo`, the prompt's first token has no alternatives either: OpenAI sends null"),
]


@cache
def document() -> dict[str, Any]:
    schemas = json.loads(SCHEMAS.read_text())
    for path, _ in sorted(RELAXED, key=lambda item: -len(item[0])):  # the deepest first: wrapping moves paths
        parent = schemas["$defs"]
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = {"anyOf": [parent[path[-1]], {"type": "null"}]}
    return schemas


def errors(name: str, instance: Any) -> list[str]:
    schema = {**copy.deepcopy(document()), "$ref": f"#/$defs/{name}"}
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


def assert_valid(name: str, instance: Any) -> None:
    assert not errors(name, instance), (errors(name, instance), instance)


def test_the_relaxations_apply_where_the_document_says_so_and_the_schema_still_bites():
    raw = json.loads(SCHEMAS.read_text())
    for path, reason in RELAXED[:3]:
        node = raw["$defs"]
        for key in path:
            node = node[key]
        assert node.get("nullable") is True, (path, reason)
    assert errors("ErrorResponse", {"error": {"message": "m", "type": "t", "param": None}})  # code is required
    assert errors("CreateChatCompletionResponse", {"id": "x", "object": "chat.completion", "created": 1,
                                                   "model": MODEL, "choices": [], "system_fingerprint": None})


def user(text: str = "What is photosynthesis?") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def events(raw: str) -> list[dict[str, Any]]:
    data = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


@pytest.mark.parametrize("extra", [{}, {"n": 3}, {"logprobs": True, "top_logprobs": 2},
                                   {"n": 2, "logprobs": True, "max_tokens": 40}])
async def test_chat_completions_validate(served, extra):
    r = await served.client.post(CHAT, json={"model": MODEL, "messages": user(), "max_tokens": 5, **extra})
    assert r.status_code == 200, r.text
    assert_valid("CreateChatCompletionResponse", body := r.json())
    assert all(choice["message"]["refusal"] is None for choice in body["choices"])


@pytest.mark.parametrize("extra", [{}, {"stream_options": {"include_usage": True}},
                                   {"n": 2, "logprobs": True, "top_logprobs": 1,
                                    "stream_options": {"include_usage": True}}])
async def test_stream_chunks_validate_and_only_the_last_carries_usage(served, extra):
    r = await served.client.post(CHAT, json={"messages": user(), "max_tokens": 6, "stream": True, **extra})
    chunks = events(r.text)
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    asked = "stream_options" in extra
    # OpenAI's document allows `usage` only as the statistics (its `nullable` is OpenAPI 3.0's, which a 2020-12
    # validator ignores): chunks other than the usage chunk leave the key out, as vLLM's server does.
    assert all("usage" not in chunk for chunk in (chunks[:-1] if asked else chunks))
    if asked:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    if extra.get("logprobs"):
        assert all(c["logprobs"]["refusal"] is None for chunk in chunks for c in chunk["choices"]
                   if "role" not in c["delta"])  # the role chunks (one a choice) carry none
    # one choice a chunk, as OpenAI and `vllm serve` send them (a client reading choices[0] missed the others)
    assert all(len(chunk["choices"]) == 1 for chunk in (chunks[:-1] if asked else chunks))
    assert {c["index"] for chunk in chunks for c in chunk["choices"]} == set(range(extra.get("n", 1)))


@pytest.mark.parametrize("extra", [{}, {"n": 2}, {"echo": True, "logprobs": 1, "max_tokens": 1},
                                   {"prompt": [[1, 2, 3]], "echo": True, "logprobs": 5, "max_tokens": 0},
                                   {"logprobs": 0, "n": 2}])
async def test_completions_validate(served, extra):
    r = await served.client.post(COMPLETIONS, json={"model": MODEL, "prompt": "Plants take in", "max_tokens": 5,
                                                    **extra})
    assert r.status_code == 200, r.text
    assert_valid("CreateCompletionResponse", body := r.json())
    assert all(choice["finish_reason"] in ("stop", "length") for choice in body["choices"])
    chunks = events((await served.client.post(COMPLETIONS, json={
        "prompt": "Plants take in", "max_tokens": 5, **extra, "stream": True,
        "stream_options": {"include_usage": True}})).text)
    for chunk in chunks:
        assert_valid("CreateCompletionResponse", chunk)
    assert all(len(chunk["choices"]) == 1 for chunk in chunks[:-1])  # one choice a chunk; the usage chunk none
    assert {c["index"] for chunk in chunks for c in chunk["choices"]} == set(range(extra.get("n", 1)))


async def test_models_validate(served):
    r = await served.client.get(MODELS)
    assert_valid("ListModelsResponse", r.json())


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("post", CHAT, {"json": {"messages": []}}, 400),
    ("post", CHAT, {"json": {"messages": user(), "model": "gpt-4"}}, 404),
    ("post", COMPLETIONS, {"json": {"prompt": [[1], [2]]}}, 400),
    ("post", CHAT, {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
    ("get", MODELS, {"headers": {"Authorization": "Bearer wrong"}}, 401),
    ("get", "/v1/nowhere", {}, 404),
])
async def test_error_bodies_validate(served, method, path, kwargs, status):
    r = await getattr(served.client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert_valid("ErrorResponse", r.json())


async def test_an_error_inside_a_stream_validates(served):
    from service.engine import EngineUnavailable

    served.engine.fail_with = EngineUnavailable("gone")
    r = await served.client.post(CHAT, json={"messages": user(), "max_tokens": 6, "stream": True})
    # Failed before its first output (the role chunk goes with it, as `vllm serve` sends it), no stream opened: the
    # error is the response, with its own status.
    assert r.status_code == 503
    assert_valid("ErrorResponse", r.json())
    served.engine.fail_with, served.engine.fail_midway = None, EngineUnavailable("gone")
    r = await served.client.post(CHAT, json={"messages": user(), "max_tokens": 6, "stream": True})
    chunks = events(r.text)
    assert r.status_code == 200 and len(chunks) >= 2  # the role chunk and the first token's, then the error
    assert_valid("ErrorResponse", chunks[-1])

