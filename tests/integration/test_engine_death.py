"""A dead engine process: /readyz fails at once, requests in flight end instead of hanging, and the server
exits with code 1 so that its supervisor restarts it. Uses a server of its own."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import linked_home
from tests.integration.conftest import STUDENT_KEY, start_server, stop_server

pytestmark = pytest.mark.integration


def engine_core_pid(server_pid: int) -> int:
    for child in os.listdir("/proc"):
        if child.isdigit():
            try:
                with open(f"/proc/{child}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                    name = cmdline.read()
            except OSError:
                continue
            if parent == server_pid and b"EngineCore" in name:
                return int(child)
    raise AssertionError("no EngineCore child process found")


def test_killed_engine_fails_readiness_ends_streams_and_exits_1(tmp_path, default_model):
    srv = start_server(linked_home(tmp_path / "home", default_model))
    try:
        outcome: dict[str, object] = {}
        streaming = threading.Event()

        def stream() -> None:
            try:
                with httpx.stream("POST", f"{srv.url}/v1/chat/completions", timeout=60,
                                  headers={"Authorization": f"Bearer {STUDENT_KEY}"},
                                  json={"messages": [{"role": "user", "content": "Describe the water cycle."}],
                                        "max_tokens": 1500, "stream": True}) as r:
                    lines = []
                    for line in r.iter_lines():
                        lines.append(line)
                        streaming.set()
                    outcome["lines"] = lines
            except httpx.HTTPError as exc:  # a dropped connection is an ending too, just not a hang
                outcome["error"] = exc

        reader = threading.Thread(target=stream)
        reader.start()
        assert streaming.wait(60)
        killed_at = time.monotonic()
        os.kill(engine_core_pid(srv.process.pid), signal.SIGKILL)

        not_ready_after = None
        while time.monotonic() - killed_at < 5:
            try:
                if httpx.get(f"{srv.url}/readyz", timeout=1).status_code == 503:
                    not_ready_after = time.monotonic() - killed_at
                    break
            except httpx.HTTPError:
                not_ready_after = time.monotonic() - killed_at  # already shutting down: not ready either
                break
            time.sleep(0.1)
        assert not_ready_after is not None and not_ready_after < 5

        reader.join(30)
        assert not reader.is_alive(), "the in-flight stream hangs"
        assert srv.process.wait(60) == 1, srv.log_tail()
    finally:
        stop_server(srv)
