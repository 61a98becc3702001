"""The free-chat doubt probe: what it counts as agreement, its AUC, and what it asks the server."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tools.chat_doubt_probe import agreement, ask, auc, auc_interval, content_words
from zephyr.schemas import MCQItem

ITEM = MCQItem(id="sciq-0", question="Who proposed the theory of evolution by natural selection?",
               options=["Scopes", "darwin", "shaw", "Linnaeus"], answer="B")


def test_content_words_leave_out_the_question_and_stop_words():
    assert content_words("It was proposed by Charles Darwin in the 1800s.", ITEM.question) == {
        "charles", "darwin", "1800s"}


def test_agreement_is_the_mean_overlap_with_each_sample():
    answer = "Charles Darwin proposed it."
    assert agreement(answer, ["Darwin, Charles.", "Linnaeus did."], ITEM.question) == pytest.approx((1 + 0) / 2)
    assert agreement("It was.", ["It is."], ITEM.question) == 0.0  # nothing said beyond the question


def test_auc_counts_pairs_and_ties_half():
    labels = np.array([True, True, False, False])
    assert auc(labels, np.array([0.9, 0.8, 0.1, 0.2])) == 1.0
    assert auc(labels, np.array([0.1, 0.2, 0.9, 0.8])) == 0.0
    assert auc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert np.isnan(auc(np.array([True, True]), np.array([0.1, 0.2])))
    low, high = auc_interval(np.array([True, False] * 20), np.array([0.9, 0.1] * 20))
    assert low == high == 1.0


async def test_ask_sends_the_question_without_options_and_reads_the_greedy_answer():
    sent = []

    def reply(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        if body["temperature"] == 0:
            return httpx.Response(200, json={"choices": [{
                "message": {"content": "Charles Darwin."}, "finish_reason": "stop",
                "logprobs": {"content": [{"logprob": -0.5}, {"logprob": -1.5}]}}]})
        return httpx.Response(200, json={"choices": [{"message": {"content": "Darwin"}}] * body["n"]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(reply), base_url="http://tutor") as client:
        row = await ask(client, ITEM, samples=3, max_tokens=32)
    assert [m["content"] for m in sent[0]["messages"]] == [ITEM.question]  # no options in the chat
    assert sent[0]["logprobs"] is True and sent[1]["n"] == 3 and sent[1]["temperature"] > 0
    assert row["verdict"] == "right" and row["mean_logprob"] == -1.0 and row["samples"] == ["Darwin"] * 3
