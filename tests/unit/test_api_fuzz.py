"""The property-based fuzzer over the app's own OpenAPI schema, on the stub engine: 1,000+ generated cases over
every route, with every role's key, a wrong key and none; no 5xx, OpenAI's error body on every 4xx, and the app
healthy afterwards. (tests/integration/test_y_api_fuzz.py runs it on the real engine.)"""

from __future__ import annotations

import os
import time

import pytest
from starlette.testclient import TestClient

from loadtest.api_fuzz import Keys, fuzz, health_problem, response_problem, send_with
from service.app import create_app
from tests.unit.conftest import ADMIN_KEY, REVIEWER_KEY, STUDENT_KEY
from tests.unit.stub_engine import StubEngine

CASES = int(os.environ.get("ZEPHYR_FUZZ_CASES", "1200"))


@pytest.fixture
def running_app(settings_factory, tokenizer):
    # The limits would turn most cases into 429s (they have their own tests); the review sampler is on so
    # that chats also reach the review queue and its routes have items to act on.
    settings = settings_factory(rate_limit="", auth_failure_limit="", sign_in_limit="", review_request_limit="",
                                review_share=0.5)
    app = create_app(settings, StubEngine.factory(tokenizer), on_fatal=lambda: None)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield app, client


def test_every_route_keeps_5xx_out_under_generated_input(running_app):
    app, client = running_app
    outcome = fuzz(send_with(client), app.openapi(), CASES, Keys(STUDENT_KEY, REVIEWER_KEY, ADMIN_KEY),
                   base_url="http://127.0.0.1", seed=int(os.environ.get("ZEPHYR_FUZZ_SEED", "0")))
    assert not outcome.failures, outcome.failures[0]
    assert outcome.cases >= min(CASES, 1000)
    routes = {route.path for route in app.routes if getattr(route, "include_in_schema", False)}
    assert {r.split(" ", 1)[1] for r in outcome.by_route} == routes  # every route was reached
    assert any(400 <= s < 500 for s in outcome.by_status) and any(s < 300 for s in outcome.by_status)
    assert health_problem(client.get) is None and not app.state.engine.errored


@pytest.mark.parametrize(("status", "content_type", "body", "wrong"), [
    (500, "application/json", b'{"error": {"message": "x", "type": "server_error", "param": null, "code": null}}',
     True),
    (400, "application/json", b'{"detail": "nope"}', True),
    (400, "text/plain", b"bad", True),
    (400, "application/json", b'{"error": {"message": "x", "type": "server_error", "param": null, "code": null}}',
     True),
    (400, "application/json", b'{"error": {"message": "", "type": "invalid_request_error", "param": null, '
                              b'"code": null}}', True),
    (422, "application/json", b'{"error": {"message": "x", "type": "invalid_request_error", "param": "n", '
                              b'"code": null}}', False),
    (200, "application/json", b"{}", False),
    # a stream's failure after its headers comes in-band under the 200 (it passed as a success)
    (200, "text/event-stream; charset=utf-8", b'data: {"choices": []}\n\ndata: {"error": {"message": "internal '
     b'error", "type": "server_error", "param": null, "code": null}}\n\ndata: [DONE]\n\n', True),
    (200, "text/event-stream", b'data: {"error": {"message": "x", "type": "invalid_request_error", "param": null, '
     b'"code": null}}\n\ndata: [DONE]\n\n', False),
    (200, "text/event-stream", b'data: {"choices": []}\n\n', True),  # cut off: no [DONE]
    (200, "text/event-stream", b'data: {"choices": [\n\ndata: [DONE]\n\n', True),  # a torn event
    (200, "text/event-stream", b'data: {"choices": []}\n\ndata: [DONE]\n\n', False),
])
def test_the_property_catches_what_it_should(status, content_type, body, wrong):
    assert (response_problem(status, content_type, body) is not None) is wrong
