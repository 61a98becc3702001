"""One real server per test session: `zephyr serve` in a subprocess, vLLM's engine on the default model."""

from __future__ import annotations

import pytest

from loadtest.harness import ADMIN_KEY, REVIEWER_KEYS, STUDENT_KEY, LocalServer, ServerFailed, linked_home

REVIEWER_KEY = REVIEWER_KEYS[0]
REVIEWER_NAME = "Ada Reviewer"  # the first reviewer key is named (name=role:key), the second is not
__all__ = ["REVIEWER_KEY", "REVIEWER_NAME", "STUDENT_KEY"]
API_KEYS = ",".join([f"student:{STUDENT_KEY}", f"admin:{ADMIN_KEY}", f"{REVIEWER_NAME}=reviewer:{REVIEWER_KEY}",
                     *(f"reviewer:{key}" for key in REVIEWER_KEYS[1:])])


@pytest.fixture(scope="session")
def server(tmp_path_factory, default_model):
    try:
        # Only chats marked with X-Zephyr-Review go to review, so the review tests know their queue exactly. The
        # API fuzzer (test_y_api_fuzz) sends hundreds of wrong keys from this address and of requests per key:
        # the per-address and per-key limits (tested in tests/unit) would refuse the tests that follow it.
        srv = LocalServer.start(linked_home(tmp_path_factory.mktemp("zephyr-home"), default_model), review_share="0",
                                auth_failure_limit="", rate_limit="", api_keys=API_KEYS)
    except ServerFailed as exc:
        pytest.fail(str(exc))
    yield srv
    srv.stop()
