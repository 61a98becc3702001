"""Runs last (file order): SIGTERM drains in-flight requests, flushes the log and exits 0."""

from __future__ import annotations

import signal
import sqlite3
import threading

import httpx
import pytest

from tests.integration.conftest import STUDENT_KEY

pytestmark = pytest.mark.integration


def test_sigterm_lets_an_in_flight_stream_finish_then_exits_cleanly(server):
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {STUDENT_KEY}"},
                          json={"messages": [{"role": "user", "content": "Explain evaporation."}],
                                "max_tokens": 200, "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    server.process.send_signal(signal.SIGTERM)
    reader.join(120)
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert server.process.wait(90) == 0, server.log_tail()
    request_id = httpx.Response(200, content=lines[0].removeprefix("data: ")).json()["id"]
    with sqlite3.connect(server.home / "zephyr.db") as db:
        assert db.execute("select count(*) from generations where id = ?", (request_id,)).fetchone()[0] == 1
