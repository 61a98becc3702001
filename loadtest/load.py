"""`make load`: the student traffic mix (loadtest/locustfile.py) against a local server, or against --url.

Starts `zephyr serve` in a throwaway home (the model linked from the registry, its own SQLite log unless
--db-url), runs Locust headless, and prints a summary per request kind. Locust's CSV and HTML reports and
the per-request event log go to --out.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict
from pathlib import Path

from rich.table import Table

from loadtest.harness import LocalServer, Locust, percentile, scratch_home
from zephyr.console import make_console

console = make_console()


def summary(events: list[dict], title: str) -> Table:
    """Per request kind: counts by outcome, latency of the answered ones and of the failed ones (a run whose slow
    requests time out would look fast on the answered ones alone), a chat's first token, and answers per minute
    over the span the requests ran (not Locust's start-up, nor its wait for the last users to finish)."""
    table = Table(title=title)
    for column in ("request", "count", "ok", "4xx", "5xx", "no response", "p50 s", "p95 s", "failed p50 s",
                   "first token p50 s", "ok per min"):
        table.add_column(column, justify="left" if column == "request" else "right")
    by_name: dict[str, list[dict]] = defaultdict(list)
    for event in events:
        by_name[event["name"]].append(event)
    span_s = max((e["end"] for e in events), default=0) - min((e["start"] for e in events), default=0)
    for name, group in sorted(by_name.items()):
        statuses = Counter(e["status"] // 100 for e in group)
        ok = [e for e in group if e["status"] < 400 and not e["error"]]
        failed = [e["end"] - e["start"] for e in group if e["status"] >= 400 or e["error"]]
        first_tokens = [e["first_token"] - e["start"] for e in ok if e.get("first_token")]
        latencies = [e["end"] - e["start"] for e in ok]
        table.add_row(name, str(len(group)), str(len(ok)), str(statuses[4]), str(statuses[5]), str(statuses[0]),
                      *(f"{percentile(latencies, q):.2f}" if latencies else "-" for q in (0.5, 0.95)),
                      f"{percentile(failed, 0.5):.2f}" if failed else "-",
                      f"{percentile(first_tokens, 0.5):.2f}" if first_tokens else "-",
                      f"{len(ok) / span_s * 60:.0f}" if span_s > 0 else "-")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server (keys in ZEPHYR_LOAD_STUDENT_KEY and "
                        "ZEPHYR_LOAD_REVIEWER_KEYS); default: start one")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--spawn-rate", type=float, default=4)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--exam-period", type=float, default=60, help="seconds between MCQ exam starts")
    parser.add_argument("--db-url", help="log store for the local server (default: SQLite in its home)")
    parser.add_argument("--out", type=Path, default=Path("load-results") / time.strftime("load-%Y%m%d-%H%M%S"))
    args = parser.parse_args()

    server = None
    if args.url is None:
        home = scratch_home("load")
        extra = {"db_url": args.db_url} if args.db_url else {}
        with console.status("starting zephyr serve (model load and warm-up)"):
            server = LocalServer.start(home, review_policy="sample", review_share="0.1", **extra)
        console.print(f"server ready at {server.url} (home {home})")
    locust = None
    try:
        with console.status(f"Locust: {args.users} users for {args.minutes:g} min"):
            locust = Locust.start(args.url or server.url, args.out, args.users, args.minutes * 60, args.spawn_rate,
                                  exam_period=args.exam_period)
            locust.wait()
        events = locust.events()
        console.print(summary(events, f"{args.users} users, {args.minutes:g} min"))
        console.print(f"reports: {args.out}/locust.html, {args.out}/locust_stats.csv, events in {locust.events_path}")
        if not any(e["status"] < 400 and not e["error"] for e in events):
            # e.g. a --url server that refuses the keys sent (401s): a run with no answer measured nothing
            raise SystemExit(f"no request succeeded ({len(events)} sent): see {args.out}/locust.html; a --url "
                             "server needs its keys in ZEPHYR_LOAD_STUDENT_KEY and ZEPHYR_LOAD_REVIEWER_KEYS")
    finally:
        try:
            if locust is not None:  # a failure part way: no Locust left driving traffic
                locust.stop()
        finally:
            if server is not None:
                server.stop(keep_log=args.out / "server.log")


if __name__ == "__main__":
    main()
