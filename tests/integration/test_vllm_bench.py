"""vLLM's own client, `vllm bench serve` (openai-chat backend), against the real server: it sends vLLM's extra
sampling parameters (ignore_eos), which this server once refused with a 400 on every request."""

from __future__ import annotations

import pytest

from loadtest import vllm_bench
from tests.integration.conftest import STUDENT_KEY

pytestmark = pytest.mark.integration


def test_vllm_bench_serve_completes_every_request(server, default_model):
    result = vllm_bench.run(server.url, default_model.name, default_model.path.resolve(), STUDENT_KEY,
                            num_prompts=8, concurrency=4, input_len=64, output_len=16, timeout=600)
    assert result["completed"] == 8 and result["failed"] == 0, result.get("errors")
    assert result["output_throughput"] > 0
