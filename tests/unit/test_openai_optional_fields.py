"""What OpenAI's and vLLM's clients send by default is taken: null for any field that has a default means "not
sent", and the fields this server does not implement are dropped when null or set to a value that asks for
nothing (HARMLESS_VALUES); any other value of them is still refused by name."""

from __future__ import annotations

import json

import pytest

from service.protocol import ChatCompletionRequest, CompletionRequest

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
CHAT_BODY = {"messages": [{"role": "user", "content": "What is photosynthesis?"}], "max_tokens": 4}
COMPLETION_BODY = {"prompt": "Plants take in", "max_tokens": 4}


def optional_fields(model) -> list[str]:
    return [name for name, field in model.model_fields.items() if not field.is_required()]


async def engine_params(served, path: str, body: dict):
    r = await served.client.post(path, json=body)
    assert r.status_code == 200, (body, r.text)
    assert r.headers["content-type"].startswith("application/json")  # `stream: null` is no stream
    return served.engine.calls[-1][1]


@pytest.mark.parametrize(("path", "body", "model"), [(CHAT, CHAT_BODY, ChatCompletionRequest),
                                                     (COMPLETIONS, COMPLETION_BODY, CompletionRequest)])
async def test_null_means_not_sent_for_every_optional_field(served, path, body, model):
    base = {key: value for key, value in body.items() if key != "max_tokens"}
    plain = await engine_params(served, path, base)
    fields = optional_fields(model)
    assert {"n", "stream", "stream_options", "presence_penalty", "frequency_penalty", "logprobs", "temperature",
            "top_p", "max_tokens", "stop", "seed", "user"} <= set(fields)
    for name in fields:
        assert await engine_params(served, path, {**base, name: None}) == plain, name
    assert await engine_params(served, path, {**base, **dict.fromkeys(fields)}) == plain  # all at once
    if path == COMPLETIONS:
        assert plain.max_tokens == 16  # OpenAI's default, for null as for absent


async def test_required_fields_stay_required(served):
    r = await served.client.post(CHAT, json={"messages": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = await served.client.post(COMPLETIONS, json={"prompt": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


async def test_null_stream_options_fields_and_null_stream_options(served):
    for options in ({"include_usage": None, "continuous_usage_stats": None}, {"continuous_usage_stats": False},
                    None):
        for path, body in ((CHAT, CHAT_BODY), (COMPLETIONS, COMPLETION_BODY)):
            r = await served.client.post(path, json={**body, "stream": True, "stream_options": options})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), (path, options, r.text)
            last = json.loads(r.text.split("data: ")[-2])
            assert "usage" not in last  # include_usage: null is false


HARMLESS_CHAT = [
    ("tools", None), ("tool_choice", None), ("tool_choice", "none"), ("functions", None), ("function_call", None),
    ("logit_bias", None), ("logit_bias", {}), ("response_format", None), ("response_format", {"type": "text"}),
    ("metadata", None), ("metadata", {}), ("prompt_cache_key", "unit-3"), ("store", False), ("store", None),
    ("parallel_tool_calls", False),
    ("parallel_tool_calls", True), ("parallel_tool_calls", None), ("best_of", 1), ("best_of", None),
    ("echo", False), ("modalities", ["text"]), ("audio", None), ("prediction", None), ("service_tier", None),
    ("reasoning_effort", None), ("web_search_options", None), ("suffix", None), ("verbosity", None),
]
HARMLESS_COMPLETIONS = [("best_of", 1), ("best_of", None), ("suffix", None), ("logit_bias", None),
                        ("logit_bias", {})]


async def test_unsupported_fields_at_their_harmless_values_are_dropped(served):
    plain = await engine_params(served, CHAT, CHAT_BODY)
    for name, value in HARMLESS_CHAT:
        assert await engine_params(served, CHAT, {**CHAT_BODY, name: value}) == plain, (name, value)
    plain = await engine_params(served, COMPLETIONS, COMPLETION_BODY)
    for name, value in HARMLESS_COMPLETIONS:
        assert await engine_params(served, COMPLETIONS, {**COMPLETION_BODY, name: value}) == plain, (name, value)


@pytest.mark.parametrize(("path", "name", "value"), [
    (CHAT, "store", True), (CHAT, "logit_bias", {"50256": -100}), (CHAT, "response_format", {"type": "json_object"}),
    (CHAT, "metadata", {"team": "x"}), (CHAT, "tools", []), (CHAT, "tools", [{"type": "function"}]),
    (CHAT, "tool_choice", "auto"), (CHAT, "best_of", 2), (CHAT, "best_of", True), (CHAT, "store", 0),
    (CHAT, "parallel_tool_calls", "yes"), (CHAT, "echo", True), (CHAT, "modalities", ["text", "audio"]),
    (CHAT, "service_tier", "auto"), (COMPLETIONS, "best_of", 2), (COMPLETIONS, "best_of", True),
    (COMPLETIONS, "logit_bias", {"1": 1}), (COMPLETIONS, "suffix", ""),
])
async def test_real_uses_of_unsupported_fields_are_still_refused(served, path, name, value):
    body = CHAT_BODY if path == CHAT else COMPLETION_BODY
    r = await served.client.post(path, json={**body, name: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] == f"`{name}` is not supported by this server; remove it from the request"
    assert error["param"] == name


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
async def test_continuous_usage_stats_is_refused_by_name(served, path):
    body = CHAT_BODY if path == CHAT else COMPLETION_BODY
    calls = len(served.engine.calls)
    r = await served.client.post(path, json={**body, "stream": True,
                                             "stream_options": {"include_usage": True,
                                                                "continuous_usage_stats": True}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "stream_options.continuous_usage_stats"
    assert "not supported" in error["message"] and "include_usage" in error["message"]
    assert len(served.engine.calls) == calls  # refused before anything was generated


async def test_the_schema_says_null_is_taken(served):
    schema = served.app.openapi()["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = schema[name]["properties"]
        for field in ("n", "stream", "presence_penalty", "temperature", "max_tokens", "stop"):
            assert {"type": "null"} in properties[field]["anyOf"], (name, field)
        assert "null" not in json.dumps(properties["messages" if name.startswith("Chat") else "prompt"])
    options = schema["StreamOptions"]["properties"]
    assert {"type": "null"} in options["include_usage"]["anyOf"]


async def test_a_reply_appended_as_the_official_client_returns_it_is_taken(served):
    # The usual multi-turn pattern: `messages.append(response.choices[0].message)`. The client sends that message
    # back with every field it read, the empty refusal, audio and tool calls included.
    from openai._utils import maybe_transform
    from openai.types.chat import ChatCompletion, completion_create_params

    first = await served.client.post(CHAT, json=CHAT_BODY)
    assert first.status_code == 200, first.text
    reply = ChatCompletion.model_validate(first.json()).choices[0].message
    messages = [*CHAT_BODY["messages"], reply, {"role": "user", "content": "And in the dark?", "name": "sam"}]
    body = maybe_transform({"messages": messages, "model": first.json()["model"], "max_tokens": 4},
                           completion_create_params.CompletionCreateParamsNonStreaming)
    assert "refusal" in body["messages"][1]  # what made it a 400 before
    r = await served.client.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    # a field of them that asks for something is still refused by name
    for name, value in (("tool_calls", [{"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]),
                        ("refusal", "I cannot help with that.")):
        turn = {**body["messages"][1], name: value}
        r = await served.client.post(CHAT, json={**body, "messages": [body["messages"][0], turn]})
        assert r.status_code == 400 and f"`{name}` is not supported" in r.text, r.text
