"""One real server per test session: `zephyr serve` in a subprocess, vLLM's engine on the default model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import linked_home

STUDENT_KEY = "it-student-key"
REVIEWER_KEY = "it-reviewer-key"
START_TIMEOUT_S = 400


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    home: Path
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> Server:
    """`zephyr serve` on a free port with the test keys; returns once /readyz answers 200."""
    port = free_port()
    env = {
        **os.environ,
        "ZEPHYR_HOME": str(home),
        "ZEPHYR_PORT": str(port),
        "ZEPHYR_API_KEYS": f"student:{STUDENT_KEY},reviewer:{REVIEWER_KEY}",
        "ZEPHYR_MAX_MODEL_LEN": "2048",
        "ZEPHYR_MEMORY_SHARE": "0.3",
        "ZEPHYR_LOG_FLUSH_SECONDS": "0.05",
        "ZEPHYR_DRAIN_SECONDS": "60",
        # Only chats marked with X-Zephyr-Review go to review, so the review tests know their queue exactly.
        "ZEPHYR_REVIEW_SHARE": "0",
    }
    log_path = home / "server.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "zephyr.cli", "serve", "--log-level", "info"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    srv = Server(process, f"http://127.0.0.1:{port}", home, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode} while starting:\n{srv.log_tail()}")
        try:
            if httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        process.kill()
        pytest.fail(f"server not ready after {START_TIMEOUT_S}s:\n{srv.log_tail()}")
    return srv


def stop_server(srv: Server) -> None:
    if srv.process.poll() is None:
        srv.process.terminate()
        try:
            srv.process.wait(60)
        except subprocess.TimeoutExpired:
            srv.process.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory, default_model):
    srv = start_server(linked_home(tmp_path_factory.mktemp("zephyr-home"), default_model))
    yield srv
    stop_server(srv)
