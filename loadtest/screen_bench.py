"""What reading answers costs a student: streamed chat latency with the safety guard's answer screen on vs off.

Two servers of ours (`ZEPHYR_SAFETY_SCREEN_ANSWERS` true and false, otherwise alike), streamed chats, one at a time
by default, greedy, so both write the same answer. Each question goes to both back to back, the first of the two
alternating, with the machine left idle between requests (as `loadtest.bench`'s logging comparison, and for the
same reason). Reports the first visible text (the first content chunk: with the screen, the first judged
sentence) and the whole answer, as p50 and as the mean paired difference with a bootstrap interval. A script to run
on demand, not a test:

    python -m loadtest.screen_bench --pairs 48 --max-tokens 96 [--concurrency 8]

`--concurrency N` sends N questions at once to one server, then the same N to the other: the guard reads answers on
one worker thread, so concurrent streams queue for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def measure(urls: dict[str, str], prompts: list[str], max_tokens: int, concurrency: int = 1) -> list[dict]:
    """Each question asked of both servers; with `concurrency` > 1, that many questions at once, as one batch sent
    to one server and then to the other (the screen's guard is one thread: concurrent streams queue for it)."""
    rows = []
    limits = httpx.Limits(max_connections=concurrency)
    async with (httpx.AsyncClient(base_url=urls[SIDES[0]], timeout=600, limits=limits) as on,
                httpx.AsyncClient(base_url=urls[SIDES[1]], timeout=600, limits=limits) as off):
        clients = dict(zip(SIDES, (on, off), strict=True))
        for side in SIDES:  # first requests of a fresh server are slower: warm both alike
            await stream_chat(clients[side], "What is light?", max_tokens)
        batches = [prompts[i:i + concurrency] for i in range(0, len(prompts), concurrency)]
        for b, batch in enumerate(tqdm(batches, desc="pairs" if concurrency == 1 else f"batches of {concurrency}")):
            batch_rows: list[dict] = [{"prompt": prompt} for prompt in batch]
            for side in SIDES if b % 2 == 0 else reversed(SIDES):
                await asyncio.sleep(SETTLE_SECONDS)
                results = await asyncio.gather(*(stream_chat(clients[side], p, max_tokens) for p in batch))
                for row, (first, answer, tokens) in zip(batch_rows, results, strict=True):
                    row[f"{side} first text"], row[f"{side} answer"], row[f"{side} tokens"] = first, answer, tokens
            rows += batch_rows
    return rows


def table(rows: list[dict], max_tokens: int, concurrency: int = 1) -> Table:
    out = Table(title=f"Streamed chat, c={concurrency}, greedy, up to {max_tokens} tokens: the answer screen on vs "
                f"off, {len(rows)} paired questions")
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
    parser.add_argument("--concurrency", type=int, default=1, help="questions streamed at once to each server")
    parser.add_argument("--port", type=int, default=8110, help="the screened server; the other gets port+1")
    parser.add_argument("--memory-share", type=float, default=0.2, help="per server (both run at once)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    if args.pairs < 1 or args.concurrency < 1:
        parser.error("--pairs and --concurrency take 1 or more")
    settings = Settings()
    entry = ensure_default_model(Registry(settings.models_dir))
    args.out.mkdir(parents=True, exist_ok=True)
    zephyr = str(Path(sys.executable).parent / "zephyr")
    base = {**harness.server_environment(), **settings.vllm_environment(), "ZEPHYR_API_KEYS": "",
            "ZEPHYR_RATE_LIMIT": "1000000/minute",
            "ZEPHYR_MEMORY_SHARE": str(args.memory_share), "ZEPHYR_LOG_GENERATIONS": "false",
            "ZEPHYR_REVIEW_POLICY": "off"}
    urls, processes = {}, []
    harness.refuse_served(*range(args.port, args.port + len(SIDES)))
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
        rows = asyncio.run(measure(urls, prompts, args.max_tokens, args.concurrency))
    finally:
        stop_all(processes)
    console.print(table(rows, args.max_tokens, args.concurrency))
    raw = args.out / f"screen-bench-c{args.concurrency}.json"
    raw.write_text(json.dumps(rows, indent=2))
    console.print(f"raw figures: {raw}")


if __name__ == "__main__":
    main()
