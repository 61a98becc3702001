"""The load/drill harness picks server ports the kernel never hands out for port 0, so vLLM's own ephemeral
sockets (taken while the engine loads, before the server binds) cannot collide with the server's port."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest

from loadtest.harness import _ephemeral_low, free_port


def test_free_port_is_outside_the_ephemeral_range_and_bindable():
    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(10_000 <= port < low for port in ports)
    assert len(ports) > 1  # random, so two servers started together rarely race for one port
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))


def test_free_port_skips_a_taken_port(monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken_port = taken.getsockname()[1]
    # Offer the taken port first: free_port must move on to the next one.
    monkeypatch.setattr("loadtest.harness.random.sample", lambda population, k: [taken_port, 12_345])
    try:
        assert free_port() == 12_345
    finally:
        taken.close()


def test_an_mcq_answer_that_breaks_the_promise_is_named():
    # In a process of its own: gevent must patch ssl before anything imports it, as under `locust -f`.
    import subprocess
    import sys

    check = """
import locust
from loadtest.locustfile import mcq_answer_problem as problem
uniform = {"A": 0.5, "B": 0.5}
assert problem({"answer": "B", "probabilities": uniform}, 2) is None
assert problem({"answer": None, "abstained": True, "probabilities": uniform}, 2) is None
assert "none of AB" in problem({"answer": "C", "probabilities": uniform}, 2)
assert "not a distribution" in problem({"answer": "A", "probabilities": {"A": 0.9, "B": 0.3}}, 2)
assert "not a distribution" in problem({"answer": "A", "probabilities": {"A": 1.0}}, 2)

# a 200 whose body is not a JSON object is named for the event log (it raised, and only Locust's log saw it)
import requests
from loadtest.locustfile import json_body
def response(status, content):
    made = requests.Response()
    made.status_code, made._content = status, content
    return made
assert json_body(response(200, b'{"id": "x"}')) == ({"id": "x"}, None)
assert json_body(response(500, b"<html>")) == ({}, None)
assert "not JSON" in json_body(response(200, b"<html>"))[1]
assert "not a JSON object" in json_body(response(200, b"[1]"))[1]
"""
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_killed_server_takes_its_engine_process_with_it():
    """vLLM's EngineCore, a child of the server, outlived a SIGKILLed server and kept its memory."""
    import subprocess
    import sys
    import time

    from loadtest.harness import _kill_tree, descendants

    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, "
                               "'-c', 'import time; time.sleep(60)']); time.sleep(60)"])
    deadline = time.monotonic() + 10
    while not descendants(parent.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = descendants(parent.pid)
    _kill_tree(parent)
    time.sleep(0.2)
    assert parent.returncode is not None
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "zombie" in status.read_text()


def test_a_drill_counts_a_dropped_request_as_queued_not_refused():
    """No answer at all passed as "refused": a request taken in, queued and dropped at exit reads the same (found by
    a review). A refusal is a 503, or no answer within a moment (the listener closed)."""
    from loadtest.drills import REFUSED_WITHIN_S, REJECTED_WITHIN_S, _refused

    assert _refused({"status": 503, "start": 0.0, "end": 0.01})
    assert not _refused({"status": 503, "start": 0.0, "end": REJECTED_WITHIN_S + 20})  # queued, then turned away
    assert _refused({"status": 0, "start": 0.0, "end": 0.05})  # connection refused: the listener has closed
    assert not _refused({"status": 0, "start": 0.0, "end": REFUSED_WITHIN_S + 20})  # waited inside, then dropped
    assert not _refused({"status": 200, "start": 0.0, "end": 0.5})


def test_the_soak_tolerates_only_the_refusals_its_mix_can_meet():
    from loadtest.soak import expected_refusal

    assert expected_refusal({"status": 409, "name": "review"})  # another reviewer settled the item first
    # The soak's server lifts the key's rate limit (every simulated student shares one key): a 429 is a regression.
    for status, name in ((401, "review"), (400, "mcq"), (404, "chat"), (409, "chat"), (429, "chat")):
        assert not expected_refusal({"status": status, "name": name})


def test_the_soak_fails_when_a_kind_of_request_never_ran():
    """A locustfile that fails to load sends nothing, and every other check passes on no traffic."""
    from loadtest.soak import MIX_KINDS, kinds_not_sent

    assert kinds_not_sent([]) == list(MIX_KINDS)
    assert kinds_not_sent([{"name": "chat"}, {"name": "review"}]) == ["mcq"]
    assert kinds_not_sent([{"name": kind} for kind in MIX_KINDS]) == []


def test_a_server_the_harness_starts_keeps_its_log_whatever_the_shell_exports(monkeypatch, tmp_path):
    """An operator's shell exporting the production database URL sent load-test chats into the real review queue."""
    from loadtest import harness

    monkeypatch.setenv("ZEPHYR_DB_URL", "postgresql+asyncpg://tutor:secret@prod/zephyr")
    monkeypatch.setenv("ZEPHYR_SPILL_PATH", "/var/lib/zephyr/spill.jsonl")
    monkeypatch.setenv("ZEPHYR_REVIEW_CANDIDATE_URL", "https://prod-candidate")
    monkeypatch.setenv("ZEPHYR_LOG_BATCH_SIZE", "32")  # a tuning setting still passes
    started = {}

    class Started:
        pid = 0

    def popen(cmd, env, **_):
        started.update(env)
        return Started()

    monkeypatch.setattr(harness.subprocess, "Popen", popen)
    monkeypatch.setattr(harness, "wait_ready", lambda *a, **k: 0.0)
    server = harness.LocalServer.start(tmp_path)
    harness._LOCAL_URLS.discard(server.url)
    assert started["ZEPHYR_DB_URL"] == server.db_url == f"sqlite+aiosqlite:///{tmp_path / 'zephyr.db'}"
    assert started["ZEPHYR_SPILL_PATH"] == str(tmp_path / "spill" / "generations.jsonl")
    assert "ZEPHYR_REVIEW_CANDIDATE_URL" not in started and started["ZEPHYR_LOG_BATCH_SIZE"] == "32"
    assert harness.LocalServer.start(tmp_path, db_url="postgresql+asyncpg://drill/db").db_url.endswith("drill/db")


async def test_a_stream_that_ends_in_an_error_chunk_is_a_failure_not_a_short_answer():
    import httpx

    from loadtest.bench import StreamFailed, stream_chat

    body = ('data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n'
            'data: {"error": {"message": "the engine failed", "type": "server_error"}}\n\n')
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(StreamFailed, match="the engine failed"):
            await stream_chat(client, "Why?", 8)
    cut = 'data: {"choices": [{"index": 0, "delta": {"content": "Because"}}]}\n\n'  # no [DONE]: timed as whole
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=cut))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(StreamFailed, match="without \\[DONE\\]"):
            await stream_chat(client, "Why?", 8)
    whole = httpx.MockTransport(lambda request: httpx.Response(200, text=cut + "data: [DONE]\n\n"))
    async with httpx.AsyncClient(transport=whole, base_url="http://t") as client:
        assert (await stream_chat(client, "Why?", 8))[0] > 0


def test_percentiles_leave_out_requests_that_streamed_no_token():
    from loadtest.harness import percentile

    assert percentile([0.3, float("nan"), 0.1, 0.2, 0.5], 0.5) == 0.2  # NaN left in, the sort put 0.1 there
    assert math.isnan(percentile([float("nan")], 0.5))
    # nearest rank: the smallest value with at least a share q at or below it (int(q*n) was one rank high)
    assert percentile([1, 2, 3, 4], 0.5) == 2 and percentile(list(range(1, 101)), 0.99) == 99
    assert percentile(list(range(1, 21)), 0.95) == 19 and percentile([7], 0.99) == 7 and percentile([1, 2], 0) == 1
