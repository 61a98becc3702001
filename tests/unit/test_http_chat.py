import json

import pytest

from service.engine import EngineUnavailable
from zephyr.settings import Settings

CHAT = "/v1/chat/completions"


def user(text="What is photosynthesis?"):
    return [{"role": "user", "content": text}]


async def test_completion_has_openai_shape_and_usage(served):
    r = await served.client.post(CHAT, json={"model": "smollm2-135m-instruct", "messages": user(), "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert r.headers["x-request-id"] == body["id"]
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


async def test_tutor_system_prompt_is_added_only_when_the_client_sends_none(app_factory):
    async with app_factory() as served:
        await served.client.post(CHAT, json={"messages": user(), "max_tokens": 2})
        await served.client.post(CHAT, json={"messages": [{"role": "developer", "content": "Be terse."}, *user()],
                                             "max_tokens": 2})
        decode = served.engine.tokenizer.decode
        with_default, with_own = (decode(ids) for ids, _ in served.engine.calls[-2:])
        assert served.settings.system_prompt in with_default
        assert "Be terse." in with_own and served.settings.system_prompt not in with_own
    async with app_factory(system_prompt_enabled=False) as served:
        await served.client.post(CHAT, json={"messages": user(), "max_tokens": 2})
        assert served.settings.system_prompt not in served.engine.tokenizer.decode(served.engine.calls[-1][0])


async def test_parameters_reach_the_engine(served):
    r = await served.client.post(CHAT, json={
        "messages": user(), "max_completion_tokens": 7, "temperature": 0.3, "top_p": 0.9, "n": 2, "stop": "###",
        "seed": 42, "presence_penalty": 0.5, "frequency_penalty": -0.5, "user": "s-1",
    })
    assert r.status_code == 200, r.text
    params = served.engine.calls[-1][1]
    assert (params.max_tokens, params.temperature, params.top_p, params.n, params.stop, params.seed) == (
        7, 0.3, 0.9, 2, ["###"], 42)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]


async def test_a_chat_that_sets_no_sampling_gets_the_servers_and_a_completion_gets_openais(app_factory):
    async with app_factory(chat_temperature=0.2, chat_top_p=0.8) as served:
        assert (await served.client.post(CHAT, json={"messages": user(), "max_tokens": 3})).status_code == 200
        params = served.engine.calls[-1][1]
        assert (params.temperature, params.top_p) == (0.2, 0.8)
        await served.client.post(CHAT, json={"messages": user(), "max_tokens": 3, "temperature": 1, "top_p": 1})
        assert (served.engine.calls[-1][1].temperature, served.engine.calls[-1][1].top_p) == (1, 1)  # the client's
        completion = await served.client.post("/v1/completions", json={"prompt": "Water is", "max_tokens": 3})
        assert completion.status_code == 200, completion.text
        assert (served.engine.calls[-1][1].temperature, served.engine.calls[-1][1].top_p) == (1.0, 1.0)
    assert (Settings().chat_temperature, Settings().chat_top_p) == (0.3, 0.9)  # chosen on SciQ validation


async def test_logprobs_follow_openai_format(served):
    r = await served.client.post(CHAT, json={"messages": user(), "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    assert {"token", "logprob", "bytes", "top_logprobs"} <= content[0].keys()
    assert len(content[0]["top_logprobs"]) == 2


async def test_stream_is_sse_ending_with_done_and_usage(served):
    async with served.client.stream("POST", CHAT, json={
        "messages": user(), "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True},
    }) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == served.engine.tokenizer.decode(
        served.engine.tokenizer.encode(served.engine.reply, add_special_tokens=False)[:6])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


async def test_the_role_chunk_goes_out_with_the_first_output_not_before(served):
    """Clients time the first token by the first chunk (vLLM's benchmark does): sent before the engine's first
    output, it timed the headers. Sent as a server sends it (httpx's test transport collects the whole body)."""
    import asyncio

    from tests.unit.test_access_and_limits import raw_post

    served.engine.delay = 0.2  # a token every 0.2 s: a chunk sent before the first output finds no step made
    served.engine.steps_generated = 0  # the stub counts from its first call, and earlier tests leave it at their own
    bodies: list[tuple[bytes, int]] = []

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            bodies.append((message["body"], served.engine.steps_generated))

    await asyncio.wait_for(raw_post(served.app, CHAT, {"messages": user(), "max_tokens": 2, "stream": True},
                                    asyncio.Event(), send), 10)
    first, steps_then = bodies[0]
    assert json.loads(first.decode().split("\n")[0].removeprefix("data: "))["choices"][0]["delta"] == {
        "role": "assistant", "content": ""}
    assert steps_then >= 1 and bodies[-1][0].decode().strip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    ("payload", "status", "fragment", "param"),
    [
        ({"messages": []}, 400, "at least 1 item", "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "wrong type", "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
         "`image_url` is not supported", "messages[0]"),
        ({"messages": user(), "tools": [{"type": "function"}]}, 400, "`tools` is not supported", "tools"),
        ({"messages": user(), "response_format": {"type": "json_object"}}, 400, "`response_format`", "response_format"),
        ({"messages": user(), "colour": "red"}, 400, "unknown field `colour`", "colour"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "role `tool`", "messages[0]"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "at least one user message", "messages"),
        ({"messages": user(), "temperature": 5}, 400, "less than or equal to 2", "temperature"),
        ({"messages": user(), "n": 99}, 400, "at most 8", "n"),
        ({"messages": user(), "top_logprobs": 2}, 400, "needs `logprobs: true`", None),
        ({"messages": user(), "model": "gpt-4"}, 404, "`gpt-4` is not served here", "model"),
        ({"messages": user(), "max_tokens": 5000}, 400, "over the context length", "max_tokens"),
        ({"messages": user("word " * 3000)}, 400, "the limit is", "messages"),
    ],
)
async def test_bad_requests_get_clear_4xx(served, payload, status, fragment, param):
    r = await served.client.post(CHAT, json=payload)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"]
    if param is not None:
        assert error["param"] == param
    assert error["type"] in ("invalid_request_error", "not_found_error")
    ok = await served.client.post(CHAT, json={"messages": user(), "max_tokens": 1})
    assert ok.status_code == 200  # and the server keeps serving


async def test_malformed_json_and_non_object_bodies(served):
    r = await served.client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = await served.client.post(CHAT, json=["a", "list"])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


async def test_dead_engine_is_503_and_not_ready(served):
    served.engine.fail_with = EngineUnavailable("the inference engine stopped")
    r = await served.client.post(CHAT, json={"messages": user(), "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    # the error names the log row it left, as an answer does (the openai client's `e.request_id`)
    row = await (await served.flushed_log()).get(r.headers["x-request-id"])
    assert row["status"] == "error" and "stopped" in row["error"]
    served.engine.die()
    assert (await served.client.get("/readyz")).status_code == 503
    # Once the engine is known dead, a stream is refused before it opens, not as a 200 carrying an error.
    r = await served.client.post(CHAT, json={"messages": user(), "max_tokens": 2, "stream": True})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    assert r.headers["connection"] == "close"


async def test_models_lists_the_served_model(served, monkeypatch):
    body = (await served.client.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == ["smollm2-135m-instruct"]
    # A hand-written manifest's naive time is UTC, as the registry reads it, whatever the server's local zone
    # (found by a review: it was read as local time).
    import time
    from datetime import UTC, datetime

    manifest = served.app.state.registry_entry.manifest
    monkeypatch.setattr(manifest, "created_at", datetime(2026, 11, 1, 12, 0))
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        card = (await served.client.get("/v1/models")).json()["data"][0]
    finally:
        monkeypatch.undo()
        time.tzset()
    assert card["created"] == int(datetime(2026, 11, 1, 12, 0, tzinfo=UTC).timestamp())


async def test_engine_death_asks_for_a_restart(served):
    served.engine.die()
    assert await served.restart_asked(4)
    assert served.fatal_calls == 1 and served.app.state.exit_code == 1


async def test_chunked_body_over_the_limit_is_413(app_factory):
    async with app_factory(max_body_bytes=1000) as served:
        async def chunks():
            for _ in range(10):
                yield b" " * 200

        r = await served.client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "ZEPHYR_MAX_BODY_BYTES" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "body_too_large"  # as a declared length's refusal says


async def test_the_openai_client_parses_completions_streams_and_models(served):
    """What the official client makes of our responses (the typed models in service/protocol.py shape them)."""
    import httpx
    import openai

    from tests.unit.conftest import STUDENT_KEY

    served.engine.reply = "Water boils at 100 °C — 水は沸騰する."
    tokenizer = served.engine.tokenizer
    ids = tokenizer.encode(served.engine.reply, add_special_tokens=False)
    expected = "".join(tokenizer.decode([t]) for t in ids)  # the stub's text, token by token
    client = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key=STUDENT_KEY, max_retries=0,
                                http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=served.app)))
    async with client:
        reply = await client.chat.completions.create(
            model="smollm2-135m-instruct", messages=user(), max_tokens=100, n=2, logprobs=True, top_logprobs=2)
        assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
        assert reply.model == "smollm2-135m-instruct" and reply.system_fingerprint is None  # left out
        assert [c.index for c in reply.choices] == [0, 1]
        for choice in reply.choices:
            assert choice.message.role == "assistant" and choice.message.content == expected
            assert choice.message.refusal is None and choice.logprobs.refusal is None
            assert choice.finish_reason == "stop"
            assert "".join(entry.token for entry in choice.logprobs.content) == expected
            first = choice.logprobs.content[0]
            assert bytes(first.bytes).decode() == first.token and len(first.top_logprobs) == 2
        assert reply.usage.completion_tokens == 2 * len(ids)
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

        plain = await client.chat.completions.create(messages=user(), model="smollm2-135m-instruct", max_tokens=3)
        assert plain.choices[0].logprobs is None and plain.choices[0].finish_reason == "length"

        for include_usage in (True, False):
            stream = await client.chat.completions.create(
                model="smollm2-135m-instruct", messages=user(), max_tokens=100, stream=True,
                stream_options={"include_usage": True} if include_usage else None)
            chunks = [chunk async for chunk in stream]
            assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
            assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
            with_choices = [c for c in chunks if c.choices]
            assert "".join(c.choices[0].delta.content or "" for c in with_choices) == expected
            assert with_choices[-1].choices[0].finish_reason == "stop"
            assert all(c.choices[0].logprobs is None and c.system_fingerprint is None for c in with_choices)
            assert all(c.usage is None for c in with_choices)
            if include_usage:
                assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
            else:
                assert chunks[-1] is with_choices[-1]

        models = await client.models.list()
        assert [m.id for m in models.data] == ["smollm2-135m-instruct"] and models.data[0].owned_by == "zephyr"


async def test_stream_chunks_keep_text_unescaped_and_leave_out_what_was_not_asked_for(served):
    served.engine.reply = "100 °C — 水"
    body = {"messages": user(), "max_tokens": 50, "stream": True}
    raw = (await served.client.post(CHAT, json=body)).content.decode()
    events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert "°" in raw and "\\u00b0" not in raw  # UTF-8 on the wire, not \u escapes
    chunks = [json.loads(event) for event in events[:-1]]
    assert all("usage" not in chunk and "system_fingerprint" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in chunks[1:] if c["choices"][0]["delta"])
    raw = (await served.client.post(CHAT, json={**body, "stream_options": {"include_usage": True}})).content.decode()
    events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    # Only the usage chunk has the key (OpenAI sends `usage: null` in the others, which its
    # OpenAPI document, read as JSON Schema 2020-12, does not allow: tests/unit/test_openai_schema.py).
    assert all("usage" not in chunk for chunk in chunks[:-1]) and chunks[-1]["usage"]["total_tokens"] > 0


async def test_a_chat_template_that_refuses_the_messages_is_a_400(served, monkeypatch):
    """Another registry model's template may demand alternating roles (raise_exception): its message, as a 400."""
    template = ("{% for m in messages %}{% if loop.index0 % 2 == 1 and m['role'] != 'assistant' %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
                "{% endif %}{{ m['content'] }}{% endfor %}")
    monkeypatch.setattr(served.engine.tokenizer, "chat_template", template)
    r = await served.client.post(CHAT, json={"messages": user("hi") + user("again"), "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "roles must alternate" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
async def test_a_stream_that_fails_before_its_first_event_is_answered_with_the_errors_own_status(served, path):
    """The headers go out with the first event: an engine gone while the request queued is a 503 the client
    retries, and a request vLLM refuses a 400, as the answer that is not streamed gets; they were a 200 whose only
    event was the error, which the openai client raises as a bare APIError it never retries (found by a review)."""
    from service.engine import EngineRejected, EngineUnavailable

    body = {"messages": user(), "max_tokens": 3} if path == CHAT else {"prompt": "Plants need", "max_tokens": 3}
    for failure, status in ((EngineUnavailable("the inference engine stopped; retry"), 503),
                            (EngineRejected("Python int too large to convert to C long"), 400)):
        served.engine.fail_with = failure
        r = await served.client.post(path, json={**body, "stream": True})
        assert r.status_code == status and r.headers["content-type"].startswith("application/json"), r.text
        assert str(failure) in r.json()["error"]["message"] and r.headers["X-Request-Id"]
    served.engine.fail_with = None
    assert served.app.state.tutor.admission.in_flight == 0
    log = await served.flushed_log()
    assert await log.count() == 2  # each logged once, as an error


async def test_a_fault_of_ours_is_logged_as_an_error_and_a_stream_says_so_in_band(served):
    import httpx

    # As a real server does: the 500 goes out and is logged (the test transport would re-raise it).
    transport = httpx.ASGITransport(app=served.manager.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1",
                                 headers=served.client.headers) as client:
        served.engine.fail_with = RuntimeError("kernel fault")
        whole = await client.post(CHAT, json={"messages": user(), "max_tokens": 3})
        assert whole.status_code == 500 and "kernel fault" not in whole.text
        # Before the stream's first event the headers have not gone out: the same 500 as the whole answer's.
        before = await client.post(CHAT, json={"messages": user(), "max_tokens": 3, "stream": True})
        assert before.status_code == 500 and before.json()["error"]["type"] == "server_error"
        assert "kernel fault" not in before.text
        served.engine.fail_with, served.engine.fail_midway = None, RuntimeError("kernel fault")
        async with client.stream("POST", CHAT, json={"messages": user(), "max_tokens": 3, "stream": True}) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        metrics = (await client.get("/metrics")).text
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert lines[-1] == "data: [DONE]" and error["type"] == "server_error" and "kernel fault" not in error["message"]
    # Its headers said 200, and the HTTP counter counts that: the failure has a counter of its own.
    assert 'zephyr_stream_errors_total{route="chat",status="500"} 1.0' in metrics
    from sqlalchemy import select

    from service.store.models import Generation

    log = await served.flushed_log()
    async with log.engine.connect() as connection:
        rows = (await connection.execute(select(Generation.status, Generation.error))).all()
    assert len(rows) == 3  # the whole answer's and the streams': errors, not "aborted" as if the student left
    assert all(status == "error" and "RuntimeError: kernel fault" in error for status, error in rows)


async def test_a_stream_keeps_the_logprobs_of_tokens_whose_text_is_held_back(served, monkeypatch):
    from service.engine import ChoiceDelta, EngineOutput, TokenLogprob

    async def held_back(prompt_ids, params, request_id):
        # vLLM sends no text for a token that may start a stop string or ends inside a character.
        for step, text in enumerate(["", "Hi", "!"]):
            entry = TokenLogprob(100 + step, text or "\ufffd", -0.5, [(100 + step, text or "\ufffd", -0.5)])
            yield EngineOutput([ChoiceDelta(0, text, [100 + step], [entry], "stop" if step == 2 else None)],
                               finished=step == 2)

    monkeypatch.setattr(served.engine, "generate", held_back)
    ask = {"messages": user(), "max_tokens": 5, "logprobs": True}
    whole = (await served.client.post(CHAT, json=ask)).json()["choices"][0]["logprobs"]["content"]
    async with served.client.stream("POST", CHAT, json={**ask, "stream": True}) as r:
        events = [json.loads(line[6:]) async for line in r.aiter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = [entry for e in events for c in e["choices"] if c.get("logprobs") for entry in c["logprobs"]["content"]]
    assert len(whole) == 3 and streamed == whole


async def test_several_greedy_answers_are_refused_before_any_work(app_factory):
    """vLLM refuses n > 1 at temperature 0, and a stream had already answered 200 when it did."""
    async with app_factory(chat_temperature=0.0) as served:
        for body in ({"messages": user(), "n": 2, "temperature": 0, "stream": True},
                     {"messages": user(), "n": 2}):  # the server's default temperature is 0 here
            calls = len(served.engine.calls)
            r = await served.client.post(CHAT, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
            assert "greedy decoding gives one answer" in r.json()["error"]["message"]
            assert len(served.engine.calls) == calls  # refused before the engine saw it
        r = await served.client.post("/v1/completions", json={"prompt": "Hi", "n": 2, "temperature": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        for temperature in (0.7, 1e-6):  # vLLM samples any temperature above 0 (under 0.01 it samples at 0.01)
            r = await served.client.post(CHAT, json={"messages": user(), "n": 2, "temperature": temperature,
                                                     "max_tokens": 2})
            assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text


async def test_an_answer_the_engine_failed_is_a_503_not_an_empty_success(served):
    served.engine.last_finish = "error"
    r = await served.client.post(CHAT, json={"messages": user(), "max_tokens": 3})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
    served.engine.last_finish = "abort"
    r = await served.client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
    assert r.status_code == 503
    served.engine.last_finish = None


async def test_what_the_official_client_and_curl_send_is_read(served):
    # the client's .parse()/.stream() helpers return messages with `parsed: null`, sent back as they came
    echoed = {"role": "assistant", "content": "Hello.", "refusal": None, "parsed": None, "tool_calls": None}
    r = await served.client.post(CHAT, json={"messages": [*user(), echoed, *user("And then?")], "max_tokens": 2,
                                             "stream": True, "stream_options": {"include_obfuscation": False}})
    assert r.status_code == 200, r.text
    # text parts are read apart, as vLLM joins them
    parts = [{"type": "text", "text": "Translate to English:"}, {"type": "text", "text": "bonjour"}]
    r = await served.client.post(CHAT, json={"messages": [{"role": "user", "content": parts}], "max_tokens": 2})
    assert r.status_code == 200
    assert "English:\nbonjour" in served.engine.tokenizer.decode(served.engine.calls[-1][0])
    r = await served.client.post(CHAT, json={"messages": [{"role": "user", "content": []}]})
    assert r.status_code == 400 and "content" in r.json()["error"]["message"]
    r = await served.client.post(CHAT, content=json.dumps({"messages": user()}))  # no Content-Type header
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]


async def test_a_model_is_retrieved_by_name(served):
    r = await served.client.get("/v1/models/smollm2-135m-instruct")
    assert r.status_code == 200 and r.json()["id"] == "smollm2-135m-instruct" and r.json()["object"] == "model"
    record = served.app.state.registry_entry.manifest.mcq_calibration  # what `eval run --server` records
    assert r.json()["mcq_calibrated_at"] == (record.created_at.isoformat() if record else None)
    r = await served.client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
