"""The MCQ fuzz's short form (loadtest/mcq_fuzz.py; `make mcq-fuzz` runs 10,000): 300 random and adversarial
questions through /mcq/batch on the session's real server, every answer checked, no 5xx, /readyz still 200."""

from __future__ import annotations

import json
import os

import pytest
from rich.console import Console

from loadtest import mcq_fuzz
from tests.integration.conftest import STUDENT_KEY

pytestmark = pytest.mark.integration

QUESTIONS = int(os.environ.get("ZEPHYR_MCQ_FUZZ_QUESTIONS", "300"))
DEADLINE_S = 900  # batches not sent by then fail the test
# Server bugs the fuzz found and reported, tolerated here (counted and printed as "known bug") until fixed, so that
# this test keeps guarding everything else; remove a name when its fix lands.
# Both bugs it found are fixed (service/tutor.py, service/errors.py): a regression fails the test.
TOLERATED: set[str] = set()


def test_mcq_fuzz_short_form(server, tokenizer, default_model):
    # The session server keeps its default explain budget (256 tokens): fewer explain questions than the long form.
    # It serves the default model with whatever calibration record it has: the cases' lengths count its
    # demonstrations.
    outcome = mcq_fuzz.fuzz(server.url, STUDENT_KEY, QUESTIONS, seed=0, tokenizer=tokenizer, batch_size=32,
                            concurrency=3, explain_share=0.02, deadline_s=DEADLINE_S, tolerate=TOLERATED,
                            demonstrations=mcq_fuzz.served_demonstrations(str(default_model.path)))
    console = Console(width=160, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(mcq_fuzz.summary_table(outcome))
    table = console.export_text()
    print(table)
    assert not outcome.failures, "\n".join(json.dumps(f, ensure_ascii=True)[:3000] for f in outcome.failures[:3])
    assert outcome.passed, table
    answers = outcome.count("answered") + outcome.count("abstained")
    assert answers > 0.7 * QUESTIONS and outcome.count("refused") > 0.05 * QUESTIONS, table
    assert server.ready()
