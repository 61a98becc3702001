"""A property-based fuzzer over the service's own OpenAPI schema (Schemathesis generates, Hypothesis drives).

Every route, valid and invalid bodies, queries and headers, each sent with every role's key, a wrong key or
none. The property: no 5xx; every 4xx carries OpenAI's error body with a client error type; and the server is
still healthy afterwards. The unit suite runs it over the stub engine (1,000+ cases), the integration suite
over the real engine (a few hundred), `make fuzz` at length against a real server:

    python -m loadtest.api_fuzz --cases 10000 [--url http://127.0.0.1:8000 --student-key ... ]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table
from schemathesis import GenerationMode
from tqdm import tqdm

from loadtest.harness import ADMIN_KEY, REVIEWER_KEYS, STUDENT_KEY, LocalServer, linked_home

CLIENT_ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                      "rate_limit_error"}
# On the real engine a generated chat may ask for the whole context; bounding the answer keeps the run's time
# bounded without making any request invalid (only counts the schema allows are lowered).
REAL_ENGINE_MAX_TOKENS = 8


@dataclass
class Keys:
    student: str = STUDENT_KEY
    reviewer: str = REVIEWER_KEYS[0]
    admin: str = ADMIN_KEY

    def identities(self) -> dict[str, str | None]:
        """Every role, a wrong key and no key at all."""
        return {"student": self.student, "reviewer": self.reviewer, "admin": self.admin, "wrong": "not-a-key",
                "none": None}


@dataclass
class Outcome:
    cases: int = 0
    by_route: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def stream_problem(content: bytes) -> str | None:
    """What is wrong with a streamed answer, or None: a failure after the headers went out comes in-band, under
    the 200 they said, as an `error` event (service/generation.py), so the status alone cannot show a 5xx."""
    events = [line[len(b"data:"):].strip() for line in content.splitlines() if line.startswith(b"data:")]
    for event in events:
        if event == b"[DONE]":
            continue
        try:
            error = json.loads(event).get("error")
        except (ValueError, AttributeError):
            return f"a streamed event is not a JSON object: {event[:300]!r}"
        if error is not None and (not isinstance(error, dict) or error.get("type") not in CLIENT_ERROR_TYPES):
            return f"200 stream with an in-band error that is not a client error: {error!r}"[:600]
    if not events or events[-1] != b"[DONE]":
        return f"200 stream that does not end with [DONE]: {content[-300:]!r}"
    return None


def response_problem(status: int, content_type: str, content: bytes) -> str | None:
    """What is wrong with a response, or None: a 5xx (a streamed one too), or a 4xx without OpenAI's error
    body."""
    if status >= 500:
        return f"{status}: {content[:300]!r}"
    if status < 400:
        return stream_problem(content) if content_type.startswith("text/event-stream") else None
    if "application/json" not in content_type:
        return f"{status} is not JSON ({content_type})"
    try:
        error = json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} without an `error` object: {content[:300]!r}"
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"{status} error body is not OpenAI's shape: {error!r}"
    if not isinstance(error["message"], str) or not error["message"].strip():
        return f"{status} has no message"
    if error["type"] not in CLIENT_ERROR_TYPES:
        return f"{status} has type {error['type']!r}, not a client error type"
    return None


def case_strategy(spec: dict) -> st.SearchStrategy:
    """Any operation of the schema, its inputs valid or not."""
    schema = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in schema.get_all_operations()]
    modes = list(GenerationMode)
    return st.sampled_from(operations).flatmap(
        lambda operation: st.sampled_from(modes).flatmap(lambda mode: operation.as_strategy(generation_mode=mode)))


def bound_generation(request: dict[str, Any]) -> dict[str, Any]:
    """Lowers a chat's or a completion's answer length for the real engine (see REAL_ENGINE_MAX_TOKENS)."""
    body = request.get("json")
    if isinstance(body, dict) and request["url"].endswith(("/v1/chat/completions", "/v1/completions")):
        for name in ("max_tokens", "max_completion_tokens"):
            if type(body.get(name)) is int and body[name] > REAL_ENGINE_MAX_TOKENS:
                body[name] = REAL_ENGINE_MAX_TOKENS
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = REAL_ENGINE_MAX_TOKENS
    return request


Send = Callable[[dict[str, Any]], httpx.Response]


def fuzz(send: Send, spec: dict, cases: int, keys: Keys, *, base_url: str, seed: int | None = 0,
         real_engine: bool = False, on_case: Callable[[], None] | None = None) -> Outcome:
    """Sends `cases` generated requests through `send` (an httpx-style request taking transport kwargs).
    Hypothesis stops at the first failing case and shrinks it; the outcome lists it."""
    outcome = Outcome()
    identities = keys.identities()

    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              report_multiple_bugs=False)
    @given(case=case_strategy(spec), identity=st.sampled_from(sorted(identities)))
    def one(case, identity: str) -> None:
        request = case.as_transport_kwargs(base_url=base_url)
        request["headers"] = {k: v for k, v in request["headers"].items() if k.lower() != "authorization"}
        if (key := identities[identity]) is not None:
            request["headers"]["Authorization"] = f"Bearer {key}"
        if real_engine:
            request = bound_generation(request)
        response = send(request)
        outcome.cases += 1
        outcome.by_route[f"{case.method.upper()} {case.path}"] += 1
        outcome.by_status[response.status_code] += 1
        if on_case is not None:
            on_case()
        problem = response_problem(response.status_code, response.headers.get("content-type", ""),
                                   response.content)
        if problem is not None:
            body = request.get("json", request.get("content"))
            raise AssertionError(f"{request['method']} {request['url']} as {identity} -> {problem}\n"
                                 f"params={request.get('params')!r}\nbody={json.dumps(body, default=str)[:2000]}")

    if seed is not None:
        one = hypothesis.seed(seed)(one)  # the same cases every run
    try:
        one()
    except AssertionError as exc:
        outcome.failures.append(str(exc))
    return outcome


def health_problem(get: Callable[[str], httpx.Response]) -> str | None:
    for path in ("/healthz", "/readyz"):
        response = get(path)
        if response.status_code != 200:
            return f"{path} answered {response.status_code} after fuzzing"
    return None


def send_with(client: httpx.Client) -> Send:
    def send(request: dict[str, Any]) -> httpx.Response:
        request = dict(request)
        return client.request(request.pop("method"), request.pop("url"), **request)

    return send


def table(outcome: Outcome, seconds: float) -> Table:
    shown = Table(title=f"API fuzz: {outcome.cases} cases in {seconds:.0f} s")
    shown.add_column("route")
    shown.add_column("cases", justify="right")
    for route, count in sorted(outcome.by_route.items()):
        shown.add_row(route, str(count))
    shown.add_row("statuses", ", ".join(f"{s}: {n}" for s, n in sorted(outcome.by_status.items())))
    shown.add_row("failures", str(len(outcome.failures)))
    return shown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=None, help="fixed cases; default: new ones every run")
    parser.add_argument("--url", help="a running server (default: start one on the default model)")
    parser.add_argument("--student-key", default=STUDENT_KEY)
    parser.add_argument("--reviewer-key", default=REVIEWER_KEYS[0])
    parser.add_argument("--admin-key", default=ADMIN_KEY)
    args = parser.parse_args(argv)
    console = Console()
    keys = Keys(args.student_key, args.reviewer_key, args.admin_key)
    server = None
    if args.url is None:
        home = linked_home(Path(tempfile.mkdtemp(prefix="zephyr-fuzz-")))
        # The limits would turn most of the run into 429s; they have their own tests.
        server = LocalServer.start(home, rate_limit="", auth_failure_limit="", sign_in_limit="",
                                   review_request_limit="", mcq_explain_max_tokens=str(REAL_ENGINE_MAX_TOKENS))
        args.url = server.url
    started = time.perf_counter()
    try:
        with httpx.Client(base_url=args.url, timeout=300) as client:
            spec = client.get("/openapi.json").json()
            with tqdm(total=args.cases, desc="fuzz", unit="case") as progress:
                outcome = fuzz(send_with(client), spec, args.cases, keys, base_url=args.url, seed=args.seed,
                               real_engine=True, on_case=lambda: progress.update())
            if (problem := health_problem(client.get)) is not None:
                outcome.failures.append(problem)
    finally:
        if server is not None:
            server.stop()
    console.print(table(outcome, time.perf_counter() - started))
    for failure in outcome.failures:
        console.print(f"[red]FAILED[/red] {failure}")
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main())
