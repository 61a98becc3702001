"""Soak run: the full traffic mix for a long stretch against one server, then three checks.

- no 5xx answer and no dropped connection, in any request kind;
- every successful generation request (chat, MCQ) has exactly one row in the generation log;
- the resident memory of the server and its engine process grows less than 10% from the first minute
  (start-up and first-use allocations) to the last.

`make soak` runs the 10-minute, 32-user form; the integration tests run a 60-second one.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import threading
import time
from pathlib import Path

from loadtest.harness import LocalServer, Locust, Report, one_row_each, rss_bytes, scratch_home
from loadtest.load import summary
from zephyr.console import make_console

console = make_console()
RSS_SAMPLE_S = 5
MAX_RSS_GROWTH = 0.10
# The API process alone in a short run (CI's minute): its baseline is taken a few seconds in, before the exam bursts'
# high-water marks (tokenizer threads, the encoder's batches, malloc arenas) have all been reached: four runs,
# passing all else, measured +9.8%, +13.0% and +17.5% on one commit and +12.8% on the one before it, which CI had
# passed at 10% by chance. A minute tells a gross leak only; `make soak` holds it to 10%.
MAX_SHORT_RUN_API_GROWTH = 0.30
SHORT_RUN_MINUTES = 5
MIX_KINDS = ("chat", "mcq", "review")  # loadtest/locustfile.py's event names: students, exam takers, reviewers


def run(minutes: float, users: int, out: Path, db_url: str | None = None, exam_period: float = 60) -> Report:
    report = Report(f"soak: {users} users for {minutes:g} min")
    home = scratch_home("soak")
    extra = {"db_url": db_url} if db_url else {}
    # Every simulated student shares one key: under the key's default limit a larger soak would be mostly 429s, a
    # load the model never saw, and still pass. Lifted here, so a 429 is a regression like any other 4xx.
    server = LocalServer.start(home, review_policy="sample", review_share="0.1", rate_limit="1000000/minute", **extra)
    # The whole tree (server, EngineCore, worker: ~8 GiB, mostly the KV cache filled page by page) and the API
    # process alone: a leak of a few hundred MiB there would hide inside the tree's allowance.
    samples: list[tuple[float, int]] = []
    api_samples: list[tuple[float, int]] = []
    stop_sampling = threading.Event()

    def sample_rss() -> None:
        while not stop_sampling.wait(RSS_SAMPLE_S):
            now = time.monotonic()
            samples.append((now, server.rss_bytes()))
            api_samples.append((now, rss_bytes(server.process.pid)))

    locust = None
    try:
        rss_at_ready = server.rss_bytes()
        api_at_ready = rss_bytes(server.process.pid)
        sampler = threading.Thread(target=sample_rss, daemon=True)
        started = time.monotonic()
        sampler.start()
        locust = Locust.start(server.url, out, users, minutes * 60, exam_period=exam_period)
        locust_exit = locust.wait()
        wall_s = time.monotonic() - started
        stop_sampling.set()
        sampler.join()
        events = locust.events()
        console.print(summary(events, report.title))

        # Every other check passes on no traffic: a locustfile that fails to load must fail the soak. (Locust's exit
        # code is 1 on any failed request, the expected 409s too, so it alone cannot tell.)
        missing = kinds_not_sent(events)
        report.check("every kind of request in the mix was sent", not missing,
                     f"none of {', '.join(missing)}; Locust exited {locust_exit}, its log: {out / 'locust.log'}"
                     if missing else f"{', '.join(MIX_KINDS)}: {len(events)} requests")

        server_errors = [e for e in events if e["status"] >= 500]
        dropped = [e for e in events if e["status"] == 0]
        report.check("no 5xx answer", not server_errors,
                     f"{len(server_errors)} of {len(events)} requests" + _codes(server_errors))
        report.check("no dropped connection", not dropped, f"{len(dropped)} requests without an answer")
        # The mix sends only valid requests: a 4xx is a regression (a key refused, an ARC question rejected), except
        # a verdict on an item another reviewer settled first (409).
        refused = [e for e in events if 400 <= e["status"] < 500 and not expected_refusal(e)]
        report.check("no unexpected 4xx", not refused, f"{len(refused)} of {len(events)} requests" + _codes(refused))
        # A 200 is no success when its stream broke off or carried an error event, or its /mcq body breaks the
        # promise of one offered letter with probabilities over the options.
        broken = [e for e in events if e["status"] == 200 and e.get("error")]
        report.check("every answer whole and well-formed", not broken,
                     f"{len(broken)} of {len(events)}" + "".join(f"; {e['name']}: {e['error']}" for e in broken[:3]))

        # An exception in a simulated user's code (an answer it could not read) reaches only Locust's own report.
        exceptions = out / "locust_exceptions.csv"  # quoted tracebacks span lines: read as CSV, a row a kind
        raised = []
        if exceptions.is_file():
            with exceptions.open(newline="") as handle:
                raised = list(csv.reader(handle))[1:]
        report.check("no exception in the simulated users", not raised,
                     f"{len(raised)} kinds, in {exceptions}: {','.join(raised[0])[:200]}" if raised else "none")

        time.sleep(1)  # the log flushes every 0.05 s; candidates for review finish first
        report.check("one log row per successful request", *one_row_each(server, events))

        # Steady state: the first minute (or first tenth of a short run) holds start-up and first-use growth.
        settle = min(60.0, wall_s / 10)
        growth = {}
        api_limit = MAX_SHORT_RUN_API_GROWTH if minutes < SHORT_RUN_MINUTES else MAX_RSS_GROWTH
        for what, series, at_ready, now, limit in (
                ("resident memory", samples, rss_at_ready, server.rss_bytes, MAX_RSS_GROWTH),
                ("the API process's resident memory", api_samples, api_at_ready,
                 lambda: rss_bytes(server.process.pid), api_limit)):
            # the baseline: the samples of a tenth of the run after the settling, as many as the end's (it was the
            # median of the first minute's, the warm-up's growth counted as the run's)
            early = [rss for t, rss in series if settle <= t - started <= settle + wall_s * 0.1] or [at_ready]
            late = [rss for t, rss in series if t >= started + wall_s * 0.9] or [now()]
            baseline, final = statistics.median(early), statistics.median(late)
            growth[what] = (baseline, final, (final - baseline) / baseline)
            report.check(f"{what} grows < {limit:.0%}", growth[what][2] < limit,
                         f"{baseline / 2**20:.0f} MiB after {settle:.0f} s -> {final / 2**20:.0f} MiB at the end "
                         f"({growth[what][2]:+.1%}); {at_ready / 2**20:.0f} MiB when ready")
        report.check("server still ready", server.ready(), "/readyz after the run")
        (baseline, final, tree_growth), (api_baseline, api_final, api_growth) = growth.values()
        report.figures.update(requests=len(events), wall_s=round(wall_s), rss_ready=rss_at_ready,
                              rss_baseline=baseline, rss_final=final, rss_growth=tree_growth,
                              api_rss_ready=api_at_ready, api_rss_baseline=api_baseline, api_rss_final=api_final,
                              api_rss_growth=api_growth,
                              rss_samples=[(round(t - started, 1), rss) for t, rss in samples],
                              api_rss_samples=[(round(t - started, 1), rss) for t, rss in api_samples])
    finally:
        stop_sampling.set()
        try:
            if locust is not None:  # a failure part way: no Locust left driving traffic at a stopped server
                locust.stop()
        finally:
            server.stop(keep_log=out / "server.log")
    report.save(out)
    return report


def kinds_not_sent(events: list[dict]) -> list[str]:
    sent = {e["name"] for e in events}
    return [kind for kind in MIX_KINDS if kind not in sent]


def expected_refusal(event: dict) -> bool:
    return event["status"] == 409 and event["name"] == "review"


def _codes(events: list[dict]) -> str:
    codes = sorted({str(e.get("code")) for e in events})
    return f" ({', '.join(codes)})" if codes else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--db-url", help="log store (default: SQLite in the server's home)")
    parser.add_argument("--out", type=Path, default=Path("load-results") / time.strftime("soak-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    with console.status(f"soak: {args.users} users for {args.minutes:g} min (Locust reports in {args.out})"):
        report = run(args.minutes, args.users, args.out, args.db_url)
    console.print(report.table())
    raise SystemExit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
