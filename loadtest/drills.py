"""Fault drills under the student traffic mix. Each starts its own server, puts Locust load on it, causes
one fault, and prints pass/fail with the figures behind each check:

    sigterm      SIGTERM under load: in-flight requests finish, new ones get 503, the process exits 0
    engine-kill  the engine process is killed: /readyz fails within 5 s, no request hangs, the server exits
    engine-hang  the engine process is stopped (SIGSTOP: alive, no output): the server finds the stall, kills the
                 engine, fails the requests waiting on it and exits for a restart
    postgres     the PostgreSQL log store is stopped for 60 s under load: no failed student request, and no
                 lost log row once it is back

`make drills` runs the long forms; the integration tests run the short ones (`--short`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from loadtest.harness import (
    REVIEWER_KEYS,
    STUDENT_KEY,
    LocalServer,
    Locust,
    Report,
    free_port,
    one_row_each,
    scratch_home,
    successful,
    whole,
)
from zephyr.console import make_console

console = make_console()
GENERATION = ("chat", "mcq")
READYZ_LIMIT_S = 5
STALL_S = 15  # the hang drill's ZEPHYR_ENGINE_STALL_SECONDS (120 by default): well above a step under its load
# A request sent this close to the fault may reach the server before or after it: judged by neither rule.
RACE_S = 0.25
# A refusal is a 503, or no answer at all when the listener has closed (the connection is refused at once); no answer
# after longer than this is a request that was taken in and dropped, what "refused, not queued" rules out.
REFUSED_WITHIN_S = 2.0
# A 503 is an answer, so the event loop's load delays it; one after this long waited in a queue before the refusal
# (seen here: at most 0.11 s).
REJECTED_WITHIN_S = 10.0
POSTGRES_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "postgres-for-tests.sh"


@dataclass(frozen=True)
class Form:
    load_s: float  # load before the fault (and after it, for the database outage)
    outage_s: float
    users: int


LONG = Form(load_s=90, outage_s=60, users=32)
SHORT = Form(load_s=20, outage_s=20, users=12)  # CI


def _home(name: str) -> Path:
    return scratch_home(name)


def _wait_exit(server: LocalServer, timeout: float) -> tuple[int | None, float]:
    try:
        code = server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.time()


def watch_readiness(server: LocalServer, since: float, timeout: float = 120,
                    on_not_ready: Callable[[], None] | None = None) -> tuple[float | None, float | None]:
    """Polls /readyz until the listener closes (or the process exits, or `timeout`). Returns the seconds from
    `since` to the first 503, and the time the listener closed (None for what did not happen). `on_not_ready` runs
    at the first 503, or at the close when no 503 came first (its requests then meet a closed port)."""
    not_ready, closed = None, None
    while server.process.poll() is None and closed is None and time.time() - since < timeout:
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 503 and not_ready is None:
                not_ready = time.time() - since
                if on_not_ready:
                    on_not_ready()
        except httpx.HTTPError as exc:
            closed = time.time()
            # probes only where the listener is gone (a slow /readyz on a busy machine is not that)
            if not_ready is None and on_not_ready and isinstance(exc, httpx.ConnectError):
                on_not_ready()
        time.sleep(0.05)
    return not_ready, closed


def _refused(event: dict) -> bool:
    waited = event["end"] - event["start"]
    return (event["status"] == 503 and waited < REJECTED_WITHIN_S) or (event["status"] == 0
                                                                         and waited < REFUSED_WITHIN_S)


def _slowest(events: list[dict]) -> float:
    return max((e["end"] - e["start"] for e in events), default=0.0)


def _statuses(events: list[dict]) -> str:
    counts = Counter(f"{e['status'] or 'no answer'}" + (f" {e['code']}" if e.get("code") else "")
                     + (" with an error event" if e["status"] == 200 and e["error"] else "") for e in events)
    return ", ".join(f"{n}x {status}" for status, n in sorted(counts.items())) or "none"


def chart_drain_seconds(profile: str = "cpu") -> str:
    """ZEPHYR_DRAIN_SECONDS as the chart's profile deploys it."""
    values = Path(__file__).resolve().parents[1] / "helm" / "zephyr" / f"values-{profile}.yaml"
    return str(yaml.safe_load(values.read_text())["config"]["ZEPHYR_DRAIN_SECONDS"])


def sigterm(load_s: float, users: int, out: Path) -> Report:
    report = Report(f"SIGTERM under load ({users} users)")
    # The CPU chart's drain, so that a pass proves the deployed setting: on a 2-core AVX2 machine the streams in
    # flight at the signal (Locust's 512-token answers, the anchor) can need a minute to finish.
    server = LocalServer.start(_home("drill-sigterm"), drain_seconds=chart_drain_seconds())
    locust = Locust.start(server.url, out, users, load_s + 240, exam_period=load_s / 2)
    probes: list[dict] = []
    try:
        time.sleep(load_s)
        # A long answer of our own in flight, so that there is always a drain to watch (Locust's chats may
        # all have just ended), and requests of our own sent during it.
        anchor = LongStream(server.url)
        anchor.started.wait(60)
        signalled = time.time()
        server.process.send_signal(signal.SIGTERM)
        # The drain phase: readiness fails while the server still answers; then the listener closes.
        not_ready, closed = watch_readiness(
            server, signalled, timeout=180,
            on_not_ready=lambda: probes.extend(probe(server.url, name) for name in GENERATION))
        code, exited = _wait_exit(server, 210)
        anchor.join(30)
        closed = closed or exited
        time.sleep(2)  # let clients meet the closed port, as they would a removed pod
    finally:
        locust.stop()
        server.stop(keep_log=out / "sigterm-server.log")
    events = [e for e in locust.events() if e["name"] in GENERATION] + probes
    # The anchor had its first bytes before the signal: in flight for certain, however close its start was.
    in_flight = [e for e in events if e["start"] < signalled - RACE_S and e["end"] > signalled] + anchor.events
    unfinished = [e for e in in_flight if not whole(e)]  # an in-band error ends with [DONE] too
    during = [e for e in events if signalled + RACE_S < e["start"] < closed - RACE_S]
    not_503 = [e for e in during if e["status"] != 503]
    after_close = [e for e in events if closed < e["start"] < exited]
    report.check("in-flight requests finish", in_flight and not unfinished,
                 f"{len(in_flight)} in flight at SIGTERM, {len(unfinished)} cut off; the last one ended "
                 f"{max((e['end'] for e in in_flight), default=signalled) - signalled:.1f} s after it")
    report.check("new requests get 503 while draining", during and not not_503,
                 f"{len(during)} sent during the drain: {_statuses(during)}")
    report.check("readiness fails while draining", not_ready is not None,
                 f"/readyz 503 after {not_ready:.2f} s" if not_ready is not None else "/readyz never failed")
    report.check("exit code 0", code == 0,
                 f"exit {code}, {exited - signalled:.1f} s after SIGTERM (listener closed after "
                 f"{closed - signalled:.1f} s: {len(after_close)} requests refused from then on)")
    report.check("in-flight requests are logged", *one_row_each(server, in_flight))
    report.figures.update(in_flight=len(in_flight), drained_s=closed - signalled, exit_s=exited - signalled,
                          refused_during_drain=len(during), exit_code=code)
    report.save(out)
    return report


class LongStream(threading.Thread):
    """A streamed chat asking for a long answer; its outcome in the event log's shape."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.started, self.events = url, threading.Event(), []
        self.start()

    def run(self) -> None:
        event = {"name": "chat", "start": time.time(), "status": 0, "done": False, "error": None, "code": None}
        body = {"messages": [{"role": "user", "content": "Describe the water cycle in great detail."}],
                "max_tokens": 300, "stream": True}
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {STUDENT_KEY}"}) as r:
                event.update(status=r.status_code, id=r.headers.get("x-request-id"))
                for line in r.iter_lines():
                    self.started.set()
                    event["done"] = event["done"] or line == "data: [DONE]"
                    if line.startswith('data: {"error"'):  # a failure after the headers: in-band, under the 200
                        event["error"] = f"stream error: {line[6:300]}"
        except httpx.HTTPError as exc:
            event["error"] = f"{type(exc).__name__}: {exc}"
        event["end"] = time.time()
        self.started.set()
        self.events.append(event)


PROBES = {  # name: (method, path, body, key)
    "chat": ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
             STUDENT_KEY),
    "mcq": ("POST", "/mcq", {"question": "Which is a gas?", "options": ["air", "ice"]}, STUDENT_KEY),
    "review": ("GET", "/review/api/next", None, REVIEWER_KEYS[0]),
}


def probe(url: str, name: str) -> dict:
    """One request of our own while the server drains (or its database is down), as an event-log line (status 0:
    no answer)."""
    method, path, body, key = PROBES[name]
    event = {"name": name, "start": time.time(), "status": 0, "done": False, "error": None, "code": None}
    try:
        r = httpx.request(method, f"{url}{path}", json=body, timeout=30, headers={"Authorization": f"Bearer {key}"})
        event.update(status=r.status_code, done=r.status_code == 200)
        if r.status_code != 200:  # a proxy's or a dying server's answer may be no JSON: kept as text, not raised
            event["code"] = r.json().get("error", {}).get("code")
    except httpx.HTTPError as exc:
        event["error"] = f"{type(exc).__name__}: {exc}"
    except ValueError:  # no JSON body
        event["error"] = f"HTTP {r.status_code} without a JSON error: {r.text[:120]!r}"
    event["end"] = time.time()
    return event


def engine_kill(load_s: float, users: int, out: Path) -> Report:
    report = Report(f"engine process killed under load ({users} users)")
    server = LocalServer.start(_home("drill-engine"))
    locust = Locust.start(server.url, out, users, load_s + 120, exam_period=load_s / 2)
    try:
        time.sleep(load_s)
        engine_pid = server.engine_core_pid()
        killed = time.time()
        os.kill(engine_pid, signal.SIGKILL)
        # Requests of our own once /readyz fails: Locust's users, thinking between requests, may send none then.
        probes: list[dict] = []
        not_ready, closed = watch_readiness(
            server, killed, timeout=30, on_not_ready=lambda: probes.extend(probe(server.url, n) for n in GENERATION))
        if not_ready is None and closed is not None:
            not_ready = closed - killed  # already closed: not ready either
        code, exited = _wait_exit(server, 120)
        time.sleep(2)
    finally:
        locust.stop()
        server.stop(keep_log=out / "engine-kill-server.log")
    events = [e for e in locust.events() if e["name"] in GENERATION]
    in_flight = [e for e in events if e["start"] < killed < e["end"]]
    longest = max((e["end"] - killed for e in in_flight), default=0.0)
    # Ours count even when they came after the exit: refused at once (the port closed) is not queued either.
    before_exit = [e for e in events if killed + RACE_S < e["start"] < exited] + probes
    report.check(f"/readyz fails within {READYZ_LIMIT_S} s", not_ready is not None and not_ready < READYZ_LIMIT_S,
                 f"after {not_ready:.2f} s" if not_ready is not None else "still ready after 30 s")
    report.check("no request hangs", in_flight and longest < 30,
                 f"{len(in_flight)} in flight at the kill ({_statuses(in_flight)}); the last ended "
                 f"{longest:.1f} s after it")
    report.check("new requests are refused, not queued", before_exit and all(_refused(e) for e in before_exit),
                 f"{len(before_exit)} sent before exit: {_statuses(before_exit)}; the slowest took "
                 f"{_slowest(before_exit):.2f} s")
    report.check("the server exits (code 1) for a restart", code == 1,
                 f"exit {code}, {exited - killed:.1f} s after the kill")
    report.figures.update(readyz_failed_s=not_ready, in_flight=len(in_flight), longest_after_kill_s=longest,
                          exit_code=code, exit_s=exited - killed)
    report.save(out)
    return report


def engine_hang(load_s: float, users: int, out: Path) -> Report:
    report = Report(f"engine process hung under load ({users} users)")
    server = LocalServer.start(_home("drill-engine-hang"), engine_stall_seconds=str(STALL_S))
    locust = Locust.start(server.url, out, users, load_s + STALL_S + 120, exam_period=load_s / 2)
    try:
        time.sleep(load_s)
        engine_pid = server.engine_core_pid()
        stopped = time.time()
        os.kill(engine_pid, signal.SIGSTOP)
        probes: list[dict] = []  # as in engine_kill: requests of our own once /readyz fails
        not_ready, closed = watch_readiness(
            server, stopped, timeout=STALL_S + 30,
            on_not_ready=lambda: probes.extend(probe(server.url, n) for n in GENERATION))
        if not_ready is None and closed is not None:
            not_ready = closed - stopped
        code, exited = _wait_exit(server, 120)
        time.sleep(2)
    finally:
        locust.stop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine_pid, signal.SIGKILL)  # the server kills it; this only guards a failed drill
        server.stop(keep_log=out / "engine-hang-server.log")
    events = [e for e in locust.events() if e["name"] in GENERATION]
    in_flight = [e for e in events if e["start"] < stopped < e["end"]]
    longest = max((e["end"] - stopped for e in in_flight), default=0.0)
    unready_at = stopped + (not_ready if not_ready is not None else STALL_S + 30)
    after_unready = [e for e in events if unready_at + RACE_S < e["start"] < exited] + probes
    limit = STALL_S + READYZ_LIMIT_S
    report.check(f"/readyz fails within {limit} s (stall limit {STALL_S} s)",
                 not_ready is not None and not_ready < limit,
                 f"after {not_ready:.2f} s" if not_ready is not None else f"still ready after {STALL_S + 30} s")
    report.check("no request hangs", in_flight and longest < STALL_S + 30,
                 f"{len(in_flight)} in flight at the stop ({_statuses(in_flight)}); the last ended "
                 f"{longest:.1f} s after it")
    report.check("new requests are refused once not ready", after_unready and all(_refused(e) for e in after_unready),
                 f"{len(after_unready)} sent before exit: {_statuses(after_unready)}; the slowest took "
                 f"{_slowest(after_unready):.2f} s")
    named = "stalled for" in server.log_path.read_text(errors="replace")
    report.check("the server exits (code 1) and its log names the stall", code == 1 and named,
                 f"exit {code}, {exited - stopped:.1f} s after the stop; stall {'named' if named else 'not named'}")
    report.figures.update(readyz_failed_s=not_ready, in_flight=len(in_flight), longest_after_stop_s=longest,
                          exit_code=code, exit_s=exited - stopped)
    report.save(out)
    return report


class ScratchPostgres:
    """A PostgreSQL of the drill's own (port and data directory), so stopping it touches nothing else."""

    def __init__(self) -> None:
        self.port = free_port()
        self.data = Path(tempfile.mkdtemp(prefix="zephyr-drill-pg-"))
        self.env = {**os.environ, "ZEPHYR_TEST_POSTGRES_PORT": str(self.port),
                    "ZEPHYR_TEST_POSTGRES_DATA": str(self.data)}
        self.url = f"postgresql+asyncpg://zephyr:zephyr@127.0.0.1:{self.port}/zephyr"

    def start(self) -> None:
        self._script()

    def stop(self) -> None:
        self._script("stop")

    def remove(self) -> None:
        """Its data folder, once stopped for good (47 MB a drill, left in /tmp before), and the script's socket
        folder and lock file beside it."""
        shutil.rmtree(self.data, ignore_errors=True)
        shutil.rmtree(f"{self.data}.socket", ignore_errors=True)
        Path(f"{self.data}.lock").unlink(missing_ok=True)

    def _script(self, *args: str) -> None:
        done = subprocess.run(["bash", str(POSTGRES_SCRIPT), *args], env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"postgres-for-tests.sh {' '.join(args)} failed:\n{done.stderr}")


def postgres(load_s: float, outage_s: float, users: int, out: Path) -> Report:
    report = Report(f"PostgreSQL stopped for {outage_s:g} s under load ({users} users)")
    database = ScratchPostgres()
    database.start()
    server = LocalServer.start(_home("drill-postgres"), db_url=database.url, review_policy="sample",
                               review_share="0.2")
    spill = server.home / "spill" / "generations.jsonl"
    locust = Locust.start(server.url, out, users, load_s * 2 + outage_s + 30, exam_period=max(20.0, outage_s / 2))
    replayed_after = None
    try:
        time.sleep(load_s)
        database.stop()
        stopped = time.time()
        # A reviewer's request of our own while it is down: Locust's reviewers wait 5-15 s between theirs, and a
        # short outage may see none, which passed the check below without testing it.
        time.sleep(min(2.0, outage_s / 4))
        outage_probe = probe(server.url, "review")
        time.sleep(max(0.0, outage_s - (time.time() - stopped)))
        spilled = server.metric("zephyr_log_spilled_rows_total")
        database.start()
        restarted = time.time()
        # The writer probes the database every ZEPHYR_LOG_RETRY_SECONDS, replays, and the load goes on.
        while time.time() - restarted < max(load_s, 120):
            if replayed_after is None and not spill.exists() and not spill.with_suffix(".replaying").exists():
                replayed_after = time.time() - restarted
            if time.time() - restarted >= load_s:
                locust.stop()
                if replayed_after is not None:
                    break
            time.sleep(0.2)
        time.sleep(1)
        events = locust.events()
        report.check("no failed student request", not [e for e in events if e["name"] in GENERATION
                                                        and not whole(e)],
                     f"{len(successful(events))} chats and MCQs: "
                     f"{_statuses([e for e in events if e['name'] in GENERATION])}")
        reviews = [e for e in events if e["name"] == "review"] + [outage_probe]
        outage = [e for e in reviews if stopped < e["start"] < restarted]
        # 503 to retry: never a 500, and no request left unanswered while it is down
        report.check("reviewers get 503 (retry), never 500, while it is down",
                     outage_probe["status"] == 503
                     and not [e for e in reviews if e["status"] >= 500 and e["status"] != 503]
                     and not [e for e in outage if e["status"] == 0],
                     f"review requests during the outage: {_statuses(outage)}")
        report.check("spilled rows are replayed once it is back", spilled > 0 and replayed_after is not None,
                     f"{spilled:.0f} rows spilled; spill file replayed {replayed_after:.1f} s after the restart"
                     if replayed_after is not None else f"{spilled:.0f} rows spilled; spill file still there")
        report.check("no lost log row", *one_row_each(server, events))
        report.figures.update(spilled_rows=spilled, replayed_after_s=replayed_after, requests=len(events))
    finally:
        locust.stop()
        server.stop(keep_log=out / "postgres-server.log")
        with contextlib.suppress(RuntimeError):  # already stopped if the drill failed during the outage
            database.stop()
        database.remove()
    report.save(out)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("drill", choices=["sigterm", "engine-kill", "engine-hang", "postgres", "all"])
    parser.add_argument("--short", action="store_true", help=f"the CI form: {SHORT}")
    parser.add_argument("--users", type=int, help=f"default {LONG.users} ({SHORT.users} with --short)")
    parser.add_argument("--out", type=Path, default=Path("load-results") / time.strftime("drills-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    form = SHORT if args.short else LONG
    users = args.users or form.users
    runs = {
        "sigterm": lambda: sigterm(form.load_s, users, args.out / "sigterm"),
        "engine-kill": lambda: engine_kill(form.load_s, users, args.out / "engine-kill"),
        "engine-hang": lambda: engine_hang(form.load_s, users, args.out / "engine-hang"),
        "postgres": lambda: postgres(form.load_s, form.outage_s, users, args.out / "postgres"),
    }
    reports = []
    for name, drill in runs.items():
        if args.drill in (name, "all"):
            with console.status(f"drill {name} (Locust reports in {args.out / name})"):
                reports.append(drill())
            console.print(reports[-1].table())
    raise SystemExit(0 if all(r.passed for r in reports) else 1)


if __name__ == "__main__":
    main()
