"""vLLM's extra sampling parameters are accepted as `vllm serve` accepts them (issue 26, item 1: `vllm bench serve`
sent `ignore_eos` and met a 400), bounded as vLLM bounds them, and reach the engine."""

from __future__ import annotations

import pytest

CHAT = "/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
EXTRAS = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 2,
          "stop_token_ids": [2], "include_stop_str_in_output": True, "skip_special_tokens": False,
          "spaces_between_special_tokens": False}


async def test_the_extras_reach_the_engine(served):
    r = await served.client.post(CHAT, json={**BODY, **EXTRAS})
    assert r.status_code == 200, r.text
    _, params = served.engine.calls[-1]
    for name, value in EXTRAS.items():
        assert getattr(params, name) == value, name


@pytest.mark.parametrize(("field", "value"), [
    ("top_k", -2), ("min_p", 1.5), ("min_p", -0.1), ("repetition_penalty", 0), ("min_tokens", -1),
    ("stop_token_ids", [-1]), ("stop_token_ids", [10**9]), ("ignore_eos", "yes"), ("min_tokens", 9),
])
async def test_values_vllm_would_refuse_are_400_naming_the_field(served, field, value):
    r = await served.client.post(CHAT, json={**BODY, field: value})
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"] or r.json()["error"]["param"] == field


async def test_what_we_do_not_implement_is_still_refused(served):
    r = await served.client.post(CHAT, json={**BODY, "tools": [{"type": "function"}]})
    assert r.status_code == 400 and "`tools` is not supported" in r.json()["error"]["message"]


def test_every_generation_parameter_reaches_vllm():
    """A new GenParams field must be passed to SamplingParams (by name) or translated, never dropped."""
    from dataclasses import fields

    from service.engine import SAMPLING_FIELDS, GenParams

    translated = {"stop", "stop_token_ids", "bad_words", "prompt_logprobs", "prompt_top_logprobs"}
    assert {f.name for f in fields(GenParams)} == set(SAMPLING_FIELDS) | translated


def test_text_decoded_from_ids_is_what_vllms_detokenizer_gives(tokenizer):
    """What a prompt-scoring request (vLLM's detokenizer off) answers: the deltas join to the decoded text, a
    character spread over byte tokens comes out whole (never a replacement character), special tokens are skipped
    as asked, and the token that stopped the answer is left out unless include_stop_str_in_output."""
    from service.engine import GenParams, TextFromIds

    text = "Café 😀 naïve 日本語.\n<|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)

    def answer(finish: str, **params) -> list[str]:
        decoded = TextFromIds(tokenizer, GenParams(max_tokens=len(ids), **params))
        return [decoded.delta(0, [token_id], finish if n == len(ids) - 1 else None) for n, token_id in enumerate(ids)]

    for finish, params, expected in (
        ("length", {}, "Café 😀 naïve 日本語.\n"),
        ("length", {"skip_special_tokens": False}, text),
        ("stop", {"skip_special_tokens": False}, "Café 😀 naïve 日本語.\n"),  # the stop token left out
        ("stop", {"skip_special_tokens": False, "include_stop_str_in_output": True}, text),
    ):
        deltas = answer(finish, **params)
        assert "".join(deltas) == expected and not any("\ufffd" in d for d in deltas), (finish, params)
    # A non-special stop token id (the newline) is left out too, as vLLM leaves it out.
    newline = ids[: ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>"))]
    decoded = TextFromIds(tokenizer, GenParams(max_tokens=len(newline)))
    assert decoded.delta(0, newline, "stop") == "Café 😀 naïve 日本語."
