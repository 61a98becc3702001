"""The OpenAPI fuzzer (loadtest/api_fuzz.py) on the real engine: a few hundred generated cases over every route
with every role's key, a wrong key and none. Runs late (file order) since it leaves review sessions and verdicts
behind; chats are bounded to a few tokens so the run's time is bounded."""

from __future__ import annotations

import os

import httpx
import pytest

from loadtest.api_fuzz import Keys, fuzz, health_problem, send_with
from tests.integration.conftest import REVIEWER_KEY, STUDENT_KEY

pytestmark = pytest.mark.integration
CASES = int(os.environ.get("ZEPHYR_REAL_FUZZ_CASES", "250"))


def test_the_real_engine_keeps_5xx_out_under_generated_input(server):
    from loadtest.harness import ADMIN_KEY

    with httpx.Client(base_url=server.url, timeout=300) as client:
        spec = client.get("/openapi.json").json()
        outcome = fuzz(send_with(client), spec, CASES, Keys(STUDENT_KEY, REVIEWER_KEY, ADMIN_KEY),
                       base_url=server.url, seed=0, real_engine=True)
        assert not outcome.failures, f"{outcome.failures[0]}\nserver log: {server.log_path}"
        assert outcome.cases >= CASES * 0.9 and any(s < 300 for s in outcome.by_status)
        assert health_problem(client.get) is None
