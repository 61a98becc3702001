"""One real server per test session: `zephyr serve` in a subprocess, vLLM's engine on the default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
        # the per-address and per-key limits (tested in tests/unit) would refuse the tests that follow it. One
        # reviewer judges each item here: its verdict completes the item, which statistics then count.
        srv = LocalServer.start(linked_home(tmp_path_factory.mktemp("zephyr-home"), default_model), review_share="0",
                                review_overlap="1", auth_failure_limit="", rate_limit="", api_keys=API_KEYS)
    except ServerFailed as exc:
        pytest.fail(str(exc))
    yield srv
    srv.stop()


# An in-process engine (`zephyr eval run`, a check script) runs beside the session's server and sometimes a test's
# own: a 1 GiB KV cache is plenty for a test's few questions, where a share of the host left it 0.1 GiB short of the
# memory check on a 24 GiB CI machine.
IN_PROCESS_ENGINE_ENV = {"ZEPHYR_KV_CACHE_GIB": "1", "HF_HUB_OFFLINE": "1"}


def run_check_script(path: Path, source: str, model_path: Path, env: dict[str, str] | None = None) -> dict:
    """Runs a check script in a Python process of its own (a fresh engine, as a rerun gets) on the model, with a
    1 GiB KV cache, and returns the JSON it printed after "RESULT "."""
    path.write_text(source)
    env = {**os.environ, **IN_PROCESS_ENGINE_ENV, "PYTHONPATH": str(Path(__file__).parents[2]), **(env or {})}
    # 300 greedy answers took about 8 minutes in bf16 on 2 AVX2 cores without AVX-512: room for a slower machine.
    run = subprocess.run([sys.executable, str(path), str(model_path)], env=env, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
