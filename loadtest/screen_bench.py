"""What reading answers costs a student: streamed chat latency with the safety guard's answer screen on vs off.

Two servers of ours (`ZEPHYR_SAFETY_SCREEN_ANSWERS` true and false, otherwise alike), streamed chats at concurrency
1, greedy, so both write the same answer. Each question goes to both back to back, the first of the two
alternating, with the machine left idle between requests (as `loadtest.bench`'s logging comparison, and for the
same reason). Reports the first visible text (the first content chunk: with the screen, the first judged
sentence) and the whole answer, as p50 and as the mean paired difference with a bootstrap interval. A script to run
on demand, not a test:

    python -m loadtest.screen_bench --pairs 60 --max-tokens 96
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import httpx
from rich.table import Table
from tqdm import tqdm

from evals.stats import paired_bootstrap
from loadtest import harness
from loadtest.bench import PROMPTS, SETTLE_SECONDS, start, stop_all, stream_chat, wait_ready
from loadtest.harness import percentile
from zephyr.bundled import ensure_default_model
from zephyr.console import make_console
from zephyr.registry import Registry
from zephyr.settings import Settings

console = make_console()
SIDES = ("screen on", "screen off")


async def measure(urls: dict[str, str], prompts: list[str], max_tokens: int) -> list[dict]:
    rows = []
    async with (httpx.AsyncClient(base_url=urls[SIDES[0]], timeout=600) as on,
                httpx.AsyncClient(base_url=urls[SIDES[1]], timeout=600) as off):
        clients = dict(zip(SIDES, (on, off), strict=True))
        for side in SIDES:  # first requests of a fresh server are slower: warm both alike
            await stream_chat(clients[side], "What is light?", max_tokens)
        for i, prompt in enumerate(tqdm(prompts, desc="pairs")):
            row: dict = {"prompt": prompt}
            for side in SIDES if i % 2 == 0 else reversed(SIDES):
                await asyncio.sleep(SETTLE_SECONDS)
                row[f"{side} first text"], row[f"{side} answer"], row[f"{side} tokens"] = await stream_chat(
                    clients[side], prompt, max_tokens)
            rows.append(row)
    return rows


def table(rows: list[dict], max_tokens: int) -> Table:
    out = Table(title=f"Streamed chat, c=1, greedy, up to {max_tokens} tokens: the answer screen on vs off, "
                f"{len(rows)} paired questions")
    for column in ("what", "on p50 ms", "off p50 ms", "mean on - off ms [95% CI]"):
        out.add_column(column, justify="right")
    for what in ("first text", "answer"):
        on = {str(i): r[f"screen on {what}"] for i, r in enumerate(rows)}
        off = {str(i): r[f"screen off {what}"] for i, r in enumerate(rows)}
        delta = paired_bootstrap(on, off)
        out.add_row("first visible text" if what == "first text" else "whole answer",
                    f"{percentile(list(on.values()), 0.5) * 1000:.0f}",
                    f"{percentile(list(off.values()), 0.5) * 1000:.0f}",
                    f"{delta.delta * 1000:+.0f} [{delta.low * 1000:+.0f}, {delta.high * 1000:+.0f}]")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48, help="questions asked of both servers")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--port", type=int, default=8110, help="the screened server; the other gets port+1")
    parser.add_argument("--memory-share", type=float, default=0.2, help="per server (both run at once)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    settings = Settings()
    entry = ensure_default_model(Registry(settings.models_dir))
    args.out.mkdir(parents=True, exist_ok=True)
    zephyr = str(Path(sys.executable).parent / "zephyr")
    base = {**os.environ, **settings.vllm_environment(), "ZEPHYR_API_KEYS": "", "ZEPHYR_RATE_LIMIT": "1000000/minute",
            "ZEPHYR_MEMORY_SHARE": str(args.memory_share), "ZEPHYR_LOG_GENERATIONS": "false",
            "ZEPHYR_REVIEW_POLICY": "off"}
    urls, processes = {}, []
    try:
        for offset, side in enumerate(SIDES):
            port = args.port + offset
            home = harness.linked_home(args.out / f"screen-bench-{offset}", entry)
            env = {**base, "ZEPHYR_PORT": str(port), "ZEPHYR_HOME": str(home),
                   "ZEPHYR_SAFETY_SCREEN_ANSWERS": str(side == SIDES[0]).lower()}
            log = args.out / f"screen-bench-{offset}.log"
            processes.append(start([zephyr, "serve"], env, log))
            urls[side] = f"http://127.0.0.1:{port}"
            console.print(f"{side}: ready in {wait_ready(f'{urls[side]}/readyz', processes[-1], log):.1f} s")
        prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i // len(PROMPTS) + 1})")
                   for i in range(args.pairs)]
        rows = asyncio.run(measure(urls, prompts, args.max_tokens))
    finally:
        stop_all(processes)
    console.print(table(rows, args.max_tokens))
    (args.out / "screen-bench.json").write_text(json.dumps(rows, indent=2))
    console.print(f"raw figures: {args.out / 'screen-bench.json'}")


if __name__ == "__main__":
    main()
