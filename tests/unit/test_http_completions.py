"""POST /v1/completions, OpenAI's legacy completions, over the stub engine: the prompt forms, echo with the prompt
tokens' log-probabilities as lm-eval's `local-completions` reads them, streaming, the refusals, and the
limits, log and metrics it shares with the chat route."""

from __future__ import annotations

import json

import pytest

from tests.unit.conftest import STUDENT_KEY
from tests.unit.test_generation_log import metric

COMPLETIONS = "/v1/completions"
PROMPT = "Question: Which gas do plants take in?\nAnswer: carbon dioxide"


def events(raw: str) -> list[dict]:
    data = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


async def test_a_text_prompt_is_continued_without_the_chat_template(served):
    r = await served.client.post(COMPLETIONS, json={"model": "smollm2-135m-instruct", "prompt": PROMPT,
                                                    "max_tokens": 5, "temperature": 0, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert r.headers["x-request-id"] == body["id"]
    tokenizer = served.engine.tokenizer
    prompt_ids, params = served.engine.calls[-1]
    assert prompt_ids == tokenizer.encode(PROMPT)  # the prompt as it is: no chat template, no system prompt
    assert (params.max_tokens, params.temperature, params.seed, params.logprobs) == (5, 0, 3, None)
    [choice] = body["choices"]
    reply = tokenizer.encode(served.engine.reply, add_special_tokens=False)[:5]
    assert choice["text"] == "".join(tokenizer.decode([t]) for t in reply)
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 5,
                             "total_tokens": len(prompt_ids) + 5}


async def test_max_tokens_defaults_to_openais_16(served):
    await served.client.post(COMPLETIONS, json={"prompt": PROMPT})
    assert served.engine.calls[-1][1].max_tokens == 16


@pytest.mark.parametrize("form", ["text", "ids", "list of text", "list of ids"])
async def test_every_prompt_form_reaches_the_engine_as_the_same_tokens(served, form):
    ids = served.engine.tokenizer.encode(PROMPT)
    prompt = {"text": PROMPT, "ids": ids, "list of text": [PROMPT], "list of ids": [ids]}[form]
    r = await served.client.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 2, "echo": True})
    assert r.status_code == 200, r.text
    assert served.engine.calls[-1][0] == ids
    assert r.json()["choices"][0]["text"].startswith(PROMPT)


async def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_reads_it(served):
    """What lm-eval's local-completions sends for a log-likelihood request, and what it makes of our answer."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    tokenizer = served.engine.tokenizer
    context, continuation = tokenizer.encode("Question: Which gas?\nAnswer:"), tokenizer.encode(" Carbon dioxide")
    r = await served.client.post(COMPLETIONS, json={
        "model": "smollm2-135m-instruct", "prompt": [context + continuation], "temperature": 0, "max_tokens": 1,
        "logprobs": 1, "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    _, params = served.engine.calls[-1]
    assert params.prompt_logprobs and params.prompt_top_logprobs == 1 and params.logprobs == 1
    body = r.json()
    logprobs = body["choices"][0]["logprobs"]
    ids = context + continuation
    assert logprobs["tokens"][:-1] == [tokenizer.decode([t]) for t in ids]
    assert len(logprobs["token_logprobs"]) == len(ids) + 1  # the prompt, then the one generated token
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    # The stub scores each prompt token -4, and +6 for one that decodes to "Carbon".
    expected = [-4.0 + (6.0 if tokenizer.decode([t]).strip() == "Carbon" else 0.0) for t in ids[1:]]
    assert logprobs["token_logprobs"][1:-1] == expected
    assert all(len(top) == 1 and max(top.values()) == value
               for top, value in zip(logprobs["top_logprobs"][1:], logprobs["token_logprobs"][1:], strict=True))
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert body["choices"][0]["text"].startswith(tokenizer.decode(ids))
    [(loglikelihood, greedy)] = LocalCompletionsAPI.parse_logprobs(body, ctxlens=[len(context)])
    assert loglikelihood == pytest.approx(sum(expected[len(context) - 1:])) and greedy


async def test_top_logprobs_hold_the_alternatives_and_the_chosen_token(served):
    r = await served.client.post(COMPLETIONS, json={"prompt": PROMPT, "max_tokens": 1, "logprobs": 3, "echo": True})
    tops = r.json()["choices"][0]["logprobs"]["top_logprobs"]
    assert all(len(top) == 3 for top in tops[1:-1])
    r = await served.client.post(COMPLETIONS, json={"prompt": PROMPT, "max_tokens": 3, "logprobs": 0})
    logprobs = r.json()["choices"][0]["logprobs"]  # no echo: the generated tokens only, placed after the prompt
    assert len(logprobs["tokens"]) == 3 and all(len(top) == 1 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == len(PROMPT)


async def test_max_tokens_0_with_echo_scores_the_prompt_and_answers_nothing_more(served):
    r = await served.client.post(COMPLETIONS, json={"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    [choice] = body["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(served.engine.tokenizer.encode(PROMPT))
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
    assert served.engine.calls[-1][1].max_tokens == 1  # the engine still runs the prompt, for one token


async def test_n_choices_each_echo_the_prompt(served):
    r = await served.client.post(COMPLETIONS, json={"prompt": PROMPT, "max_tokens": 3, "n": 2, "echo": True})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and all(c["text"].startswith(PROMPT) for c in choices)
    assert r.json()["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("extra", [{}, {"echo": True, "logprobs": 2, "n": 2}])
async def test_the_stream_adds_up_to_the_whole_answer(served, extra):
    body = {"prompt": PROMPT, "max_tokens": 6, **extra}
    whole = (await served.client.post(COMPLETIONS, json=body)).json()
    r = await served.client.post(COMPLETIONS, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r.text)
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all("usage" not in chunk for chunk in chunks[:-1])
    for choice in whole["choices"]:
        parts = [c for chunk in chunks for c in chunk["choices"] if c["index"] == choice["index"]]
        assert "".join(c["text"] for c in parts) == choice["text"]
        assert [c["finish_reason"] for c in parts][-1] == choice["finish_reason"]
        assert all(c["finish_reason"] is None for c in parts[:-1])
        if extra:
            streamed = [value for c in parts for value in c["logprobs"]["token_logprobs"]]
            assert streamed == choice["logprobs"]["token_logprobs"]
            assert [o for c in parts for o in c["logprobs"]["text_offset"]] == choice["logprobs"]["text_offset"]


@pytest.mark.parametrize(("payload", "status", "fragment", "param"), [
    ({}, 400, "Field required", "prompt"),
    ({"prompt": ""}, 400, "`prompt` is empty", "prompt"),
    ({"prompt": []}, 400, "`prompt` is empty", "prompt"),
    ({"prompt": [[]]}, 400, "`prompt` is empty", "prompt"),
    ({"prompt": ["a", "b"]}, 400, "holds 2 prompts", "prompt"),
    ({"prompt": [[1], [2], [3]]}, 400, "holds 3 prompts", "prompt"),
    ({"prompt": 7}, 400, "wrong type", "prompt"),
    ({"prompt": [1, "a"]}, 400, "a valid integer", "prompt[1]"),  # the token-id list's own error, not "a string"
    ({"prompt": [-1]}, 400, "greater than or equal to 0", "prompt[0]"),
    # inside a list holding one prompt, the error is named where the client put it
    ({"prompt": [[1, "a"]]}, 400, "a valid integer", "prompt[0][1]"),
    ({"prompt": [[5, -1]]}, 400, "greater than or equal to 0", "prompt[0][1]"),
    ({"prompt": [""]}, 400, "`prompt` is empty", "prompt"),
    ({"prompt": [10**9]}, 400, "", "prompt"),
    ({"prompt": [60000]}, 400, "outside the vocabulary", "prompt"),
    ({"prompt": "hi", "logprobs": 6}, 400, "less than or equal to 5", "logprobs"),
    ({"prompt": "hi", "logprobs": True}, 400, "", "logprobs"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "greater than or equal to 0", "max_tokens"),
    ({"prompt": "hi", "max_tokens": 5000}, 400, "over the context length", "max_tokens"),
    ({"prompt": "hi", "echo": "yes"}, 400, "", "echo"),
    ({"prompt": "hi", "best_of": 2}, 400, "`best_of` is not supported", "best_of"),
    ({"prompt": "hi", "suffix": "x"}, 400, "`suffix` is not supported", "suffix"),
    ({"prompt": "hi", "messages": []}, 400, "unknown field `messages`", "messages"),
    ({"prompt": "hi", "n": 99}, 400, "at most 8", "n"),
    ({"prompt": "hi", "stop": ["a"] * 5}, 400, "up to 4", "stop"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "allowed with `stream: true`", "stream_options"),
    ({"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, 400, "`min_tokens` (3) is more", "min_tokens"),
    # the limit the client never sent is said to be the default
    ({"prompt": "hi", "min_tokens": 20}, 400, "answer's limit (16, the default `max_tokens`)", "min_tokens"),
    ({"prompt": list(range(100, 2140))}, 400, "`max_tokens` is 16 (the default)", "max_tokens"),
    ({"prompt": "word " * 3000}, 400, "the limit is", "prompt"),
    ({"prompt": list(range(100, 2200))}, 400, "shorten the prompt", "prompt"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "`gpt-4` is not served here", "model"),
])
async def test_bad_requests_get_400s_naming_the_field(served, payload, status, fragment, param):
    r = await served.client.post(COMPLETIONS, json=payload)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["param"] == param, error


async def test_keys_limits_admission_log_and_metrics_apply_as_to_chats(app_factory):
    async with app_factory(rate_limit="2/minute", max_in_flight=1) as served:
        anonymous = await served.client.post(COMPLETIONS, json={"prompt": "hi"}, headers={"Authorization": ""})
        assert anonymous.status_code == 401
        served.app.state.tutor.admission.in_flight = 1  # the one place is taken
        busy = await served.client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "overloaded"
        served.app.state.tutor.admission.in_flight = 0
        r = await served.client.post(COMPLETIONS, json={"prompt": PROMPT, "max_tokens": 4, "user": "s-9"})
        assert r.status_code == 200, r.text
        limited = await served.client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2})
        assert limited.status_code == 429
        log = await served.flushed_log()
        row = await log.get(r.json()["id"])
        assert row["route"] == "completions" and row["status"] == "ok" and row["user"] == "s-9"
        assert row["messages"] == [{"role": "prompt", "content": PROMPT}]
        assert row["response"][0]["content"] == r.json()["choices"][0]["text"]
        assert row["params"]["echo"] is False and row["completion_tokens"] == 4
        text = (await served.client.get("/metrics")).text
        assert metric(text, "zephyr_completion_tokens_total", route="completions") == 4
        assert metric(text, "zephyr_http_requests_total", route=COMPLETIONS, status="200") == 1


async def test_the_openai_client_parses_completions_and_their_stream(served):
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key=STUDENT_KEY, max_retries=0,
                                http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=served.app)))
    async with client:
        reply = await client.completions.create(model="smollm2-135m-instruct", prompt=PROMPT, max_tokens=1,
                                                echo=True, logprobs=2, n=2)
        assert reply.object == "text_completion" and [c.index for c in reply.choices] == [0, 1]
        choice = reply.choices[0]
        assert choice.text.startswith(PROMPT) and choice.finish_reason == "length"
        assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.top_logprobs[1]) == 2
        assert reply.usage.completion_tokens == 2
        stream = await client.completions.create(model="smollm2-135m-instruct", prompt=PROMPT, max_tokens=3,
                                                 stream=True)
        parts = [chunk async for chunk in stream]
        assert "".join(c.choices[0].text for c in parts) == (await client.completions.create(
            model="smollm2-135m-instruct", prompt=PROMPT, max_tokens=3)).choices[0].text


async def test_echoed_offsets_keep_rising_past_a_prompt_of_byte_tokens(served):
    """The prompt's listed pieces may decode longer than its text (a character spread over byte tokens): the
    answer's offsets continue after them, streamed or not."""
    import json

    body = {"prompt": "Café 😀 naïve 日本語", "max_tokens": 3, "echo": True, "logprobs": 0}
    whole = (await served.client.post("/v1/completions", json=body)).json()["choices"][0]["logprobs"]
    streamed = await served.client.post("/v1/completions", json={**body, "stream": True})
    offsets = []
    for line in streamed.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line.removeprefix("data: "))["choices"]:
                offsets += (choice["logprobs"] or {}).get("text_offset", [])
    rising = whole["text_offset"]
    assert len(whole["tokens"]) > 3 and rising == sorted(rising)
    assert offsets == whole["text_offset"]


async def test_stop_strings_with_a_scored_prompt_are_a_400_naming_stop(served):
    r = await served.client.post("/v1/completions", json={"prompt": "2+2=", "max_tokens": 5, "echo": True,
                                                          "logprobs": 1, "stop": ["\n"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop" and "stop_token_ids" in r.text
    ok = await served.client.post("/v1/completions", json={"prompt": "2+2=", "max_tokens": 5, "stop": ["\n"]})
    assert ok.status_code == 200
