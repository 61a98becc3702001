"""The logging-cost bench's request loop against the real server (`make bench` is the only other caller, and a
mistake in it surfaced only after both servers had started): every question is asked as a chat and an MCQ of
both sides, in alternating order, and the rows feed logging_summary."""

from __future__ import annotations

import asyncio

import pytest

from loadtest.bench import logging_cost, logging_summary
from tests.integration.conftest import STUDENT_KEY
from zephyr import mcq

pytestmark = pytest.mark.integration


def test_logging_cost_times_each_question_on_both_sides(server):
    questions = [mcq.MCQuestion("What do plants need to make food?", ("sunlight", "rocks", "sand", "salt")),
                 mcq.MCQuestion("Which is a liquid at room temperature?", ("iron", "water", "wood"))]
    rows = asyncio.run(logging_cost({"log on": server.url, "log off": server.url}, questions, pairs=2,
                                    max_tokens=4, settle_s=0.1, headers={"authorization": f"Bearer {STUDENT_KEY}"}))
    assert [(r["route"], r["question"]) for r in rows] == [("chat", 0), ("mcq", 0), ("chat", 1), ("mcq", 1)]
    assert all(r["log on"] > 0 and r["log off"] > 0 for r in rows)
    summary = logging_summary(rows, "mcq")
    assert summary["pairs"] == 2 and summary["mean_off_s"] > 0
