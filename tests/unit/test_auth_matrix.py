"""Who may call what, generated from `app.routes`: a route without a rule here fails the test, so a new route
cannot ship without someone deciding who may use it."""

from __future__ import annotations

import pytest

from tests.unit.conftest import ADMIN_KEY, REVIEWER_KEY, STUDENT_KEY

PUBLIC = "public"  # no key needed (probes, metrics, the schema, the review page and its sign-in)
ANY_ROLE = frozenset({"student", "reviewer", "admin"})
REVIEWERS = frozenset({"reviewer", "admin"})
ADMINS = frozenset({"admin"})

RULES: dict[tuple[str, str], str | frozenset[str]] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/review"): PUBLIC,
    ("GET", "/review/static/{name}"): PUBLIC,
    ("POST", "/review/session"): PUBLIC,  # checks the key in its body (its own tests)
    ("DELETE", "/review/session"): PUBLIC,
    ("GET", "/v1/models"): ANY_ROLE,
    ("GET", "/v1/models/{model}"): ANY_ROLE,
    ("POST", "/v1/chat/completions"): ANY_ROLE,
    ("POST", "/v1/completions"): ANY_ROLE,
    ("POST", "/mcq"): ANY_ROLE,
    ("POST", "/mcq/batch"): ANY_ROLE,
    ("GET", "/review/api/me"): REVIEWERS,
    ("GET", "/review/api/guidelines"): REVIEWERS,
    ("GET", "/review/api/next"): REVIEWERS,
    ("POST", "/review/api/verdicts"): REVIEWERS,
    ("POST", "/review/api/skip"): REVIEWERS,
    ("POST", "/review/api/undo"): REVIEWERS,
    ("GET", "/review/stats"): REVIEWERS,
    ("GET", "/review/export"): ADMINS,
}
KEYS = {"student": STUDENT_KEY, "reviewer": REVIEWER_KEY, "admin": ADMIN_KEY}
CHAT_PATH = "/v1/chat/completions"
PATH_VALUES = {"{name}": "review.js"}


def concrete(path: str) -> str:
    for template, value in PATH_VALUES.items():
        path = path.replace(template, value)
    return path


async def routes_of(app) -> set[tuple[str, str]]:
    found = set()
    for route in app.routes:
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":
                found.add((method, route.path))
    return found


async def test_every_route_has_a_rule(served):
    routes = await routes_of(served.app)
    missing = routes - set(RULES)
    assert not missing, f"routes without an access rule in tests/unit/test_auth_matrix.py: {sorted(missing)}"
    assert not set(RULES) - routes, f"rules for routes that no longer exist: {sorted(set(RULES) - routes)}"


@pytest.mark.parametrize("identity", ["none", "wrong", "student", "reviewer", "admin"])
async def test_each_identity_gets_exactly_what_its_rule_allows(app_factory, identity):
    async with app_factory(rate_limit="", auth_failure_limit="") as served:
        headers = {"Authorization": "" if identity == "none" else
                   f"Bearer {KEYS.get(identity, 'not-a-key')}"}
        for (method, path), rule in sorted(RULES.items(), key=str):
            if (method, path) == ("DELETE", "/review/session"):
                continue  # signs out: harmless, and nothing to authorize
            r = await served.client.request(method, concrete(path), headers=headers,
                                            json={} if method == "POST" else None)
            where = f"{method} {path} as {identity}: {r.status_code} {r.text[:200]}"
            if rule == PUBLIC:
                assert r.status_code not in (401, 403) or path == "/review/session", where
            elif identity in rule:
                assert r.status_code not in (401, 403), where
            elif identity in ("none", "wrong"):
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", where
            else:
                assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", where


async def test_credentials_are_checked_before_the_body_is_parsed(app_factory):
    """FastAPI parses a JSON body before any dependency runs: a request without a key (never counted against its
    address) had the event loop parse up to a megabyte of JSON, every time. Its body is now left unread."""
    twice = '{"question": "Which gas?", "question": "Which metal?", "options": ["a", "b"]}'
    large_twice = '{"messages": [' + ",".join(['{"role": "user", "content": "hi"}'] * 3000) + '], "n": 1, "n": 2}'
    async with app_factory(rate_limit="", auth_failure_limit="") as served:
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer not-a-key"}):  # none (the client's own
            # default is a student key), and a wrong one
            for path, body in (("/mcq", twice), (CHAT_PATH, large_twice)):
                r = await served.client.post(path, content=body, headers={**headers,
                                                                         "Content-Type": "application/json"})
                assert r.status_code == 401, r.text  # not the 400 its parsed body would have earned
        for path, body, field in (("/mcq", twice, "question"), (CHAT_PATH, large_twice, "n")):
            assert len(body) > 64 * 1024 or path == "/mcq"  # the large one is parsed off the event loop
            r = await served.client.post(path, content=body, headers={"Authorization": f"Bearer {STUDENT_KEY}",
                                                                      "Content-Type": "application/json"})
            assert r.status_code == 400 and f"key `{field}` appears twice" in r.text, r.text
