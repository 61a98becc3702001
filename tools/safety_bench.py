"""What the chat safety guard costs a request: the latency of `SafetyGuard.judge` on messages of growing length,
up to the longest prompt the server takes by default (16 characters per prompt token of a 2,048-token context).
Every run judges a message the guard has not seen (its cache would answer a repeat at once: the last row).

    python -m tools.safety_bench [--repeats 50]

Prints a table of p50 / p90 milliseconds per message length; a benchmark to run on demand, not a test."""

from __future__ import annotations

import argparse
import statistics
import time

from rich.table import Table

from zephyr.console import make_console
from zephyr.safety import SafetyGuard, load_record, segments
from zephyr.settings import Settings

QUESTION = "Why do leaves change colour in autumn, and where does the green go? "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="judgements per length (default 50)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    console = make_console()
    guard = SafetyGuard(load_record(Settings().safety_record))  # the record the server would judge with
    guard.judge("warm-up")
    table = Table(title=f"SafetyGuard.judge, {args.repeats} runs a length (fewer for the longest)")
    for column in ("characters", "segments", "p50 ms", "p90 ms"):
        table.add_column(column, justify="right")
    def row(label: str, texts: list[str]) -> None:
        times = []
        for text in texts:
            start = time.perf_counter()
            guard.judge(text)
            times.append((time.perf_counter() - start) * 1000)
        deciles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
        table.add_row(label, str(len(segments(texts[0]))), f"{statistics.median(times):.1f}", f"{deciles[8]:.1f}")

    for chars in (70, 900, 4000, 16 * 2047):
        runs = args.repeats if chars < 10_000 else max(1, args.repeats // 10)
        # A run number in front: each message is new to the guard's cache, and as long as the others.
        row(f"{chars:,}", [f"{run} {QUESTION * (chars // len(QUESTION) + 1)}"[:chars] for run in range(runs)])
    cached = (QUESTION * 2)[:70]
    guard.judge(cached)
    row("70, judged before (cached)", [cached] * args.repeats)
    console.print(table)


if __name__ == "__main__":
    main()
