"""How fast vLLM's engine generates in bf16 and in fp32 on this machine: the measurement behind `ZEPHYR_DTYPE=auto`
choosing fp32 for bf16 checkpoints on CPUs without AMX tiles (zephyr.numerics.resolve_dtype).

    python -m tools.dtype_bench [--model NAME] [--prompts 32] [--tokens 64]

Each dtype runs in a fresh process with the engine arguments the server uses (Settings.vllm_engine_kwargs, with a
1 GiB KV cache), generating `--tokens` greedy tokens for each of `--prompts` prompts after one warm-up request. It
prints the CPU's instruction set, the engine's start time and generated tokens/s per dtype."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from zephyr.console import make_console
from zephyr.numerics import served_dtype
from zephyr.registry import Registry
from zephyr.settings import DEFAULT_MODEL, Settings

WORKER = """
import json, os, sys, time
from pathlib import Path


def main():
    from vllm import LLM, SamplingParams
    from zephyr.settings import Settings

    path, dtype, prompts, tokens = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    settings = Settings(dtype=dtype, kv_cache_gib=1)
    os.environ.update(settings.vllm_environment())
    started = time.perf_counter()
    llm = LLM(model=str(path), **settings.vllm_engine_kwargs(path))
    loaded = time.perf_counter()
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate(["Warm up."], params, use_tqdm=False)
    asks = [f"Question {i}: why is the sky blue? Explain briefly." for i in range(prompts)]
    began = time.perf_counter()
    out = llm.generate(asks, params, use_tqdm=False)
    seconds = time.perf_counter() - began
    generated = sum(len(o.outputs[0].token_ids) for o in out)
    print("RESULT " + json.dumps({"start_s": loaded - started, "tokens": generated, "seconds": seconds}), flush=True)
    llm.llm_engine.engine_core.shutdown()  # its processes hold this one's output pipe open until they exit


if __name__ == "__main__":
    main()
"""


def measure(model_path: str, dtype: str, prompts: int, tokens: int) -> dict:
    done = subprocess.run([sys.executable, "-c", WORKER, model_path, dtype, str(prompts), str(tokens)],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                          capture_output=True, text=True, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{dtype} run failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[0][7:])


def main(model: Annotated[str, typer.Option(help="registry model")] = DEFAULT_MODEL,
         prompts: Annotated[int, typer.Option(min=1, max=4096)] = 32,
         tokens: Annotated[int, typer.Option(min=1, max=2048)] = 64) -> None:
    import torch

    console = make_console()
    path = str(Registry(Settings().models_dir).get(model).path)
    capability = torch.backends.cpu.get_cpu_capability()
    amx = torch.cpu._is_amx_tile_supported()
    table = Table(title=f"{model}: {prompts} prompts x {tokens} greedy tokens, CPU {capability}"
                        f"{' with AMX' if amx else ', no AMX'}")
    for column in ("dtype", "engine start s", "generate s", "tokens/s"):
        table.add_column(column, justify="right" if column != "dtype" else "left")
    for dtype in ("bfloat16", "float32"):
        console.print(f"measuring {dtype} ...")
        result = measure(path, dtype, prompts, tokens)
        table.add_row(dtype, f"{result['start_s']:.1f}", f"{result['seconds']:.1f}",
                      f"{result['tokens'] / result['seconds']:.1f}")
    console.print(table)
    console.print(f"ZEPHYR_DTYPE=auto computes this model in {served_dtype(Path(path))}")


if __name__ == "__main__":
    typer.run(main)
