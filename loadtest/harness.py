"""A real `zephyr serve` in a subprocess, Locust against it, and what the soak run and the drills measure
(resident memory, log rows). Shared by `make load`, the soak run, the fault drills and the integration tests."""

from __future__ import annotations

import asyncio
import atexit
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

from zephyr.bundled import ensure_default_model
from zephyr.registry import MANIFEST, Registry, RegistryEntry
from zephyr.settings import DEFAULT_MODEL, Settings

STUDENT_KEY = "load-student-key"
REVIEWER_KEYS = ("load-reviewer-key-1", "load-reviewer-key-2")
ADMIN_KEY = "load-admin-key-0001"
START_TIMEOUT_S = 400
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
# The URLs of the servers LocalServer started in this process: those hold the load keys above, so Locust must use
# them whatever the environment says. Any other URL (`make load --url`) is a server with keys of its own.
_LOCAL_URLS: set[str] = set()


class ServerFailed(RuntimeError):
    pass


def refuse_served(*ports: int) -> None:
    """SystemExit when a port is already served. Our server binds only once vLLM has loaded: a server left on the
    port (a bench killed outright leaves its own, in their session) would answer /readyz at once, and be timed
    instead."""
    for port in ports:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise SystemExit(f"port {port} is already served (a server left by an earlier run?); stop it or give "
                                 "another --port")


def free_port() -> int:
    """A free port below the kernel's ephemeral range. The server binds it only after vLLM has loaded, and
    vLLM (ZMQ, gloo) takes ephemeral ports meanwhile; a port from that range could be handed to one of them
    first ("address already in use", seen in CI). Ports outside it are never given out for port 0."""
    low = _ephemeral_low()
    for port in random.sample(range(10_000, low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ServerFailed(f"no free port between 10000 and {low}")


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for port 0."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def linked_home(home: Path, default_model: RegistryEntry | None = None) -> Path:
    """A fresh ZEPHYR_HOME whose registry holds the default model as a link (no second conversion)."""
    default_model = default_model or ensure_default_model(Registry(Settings().models_dir))
    (home / "models").mkdir(parents=True, exist_ok=True)
    link = Registry(home / "models").path_of(DEFAULT_MODEL)
    if not link.exists():
        link.symlink_to(default_model.path, target_is_directory=True)
    return home


def scratch_home(name: str) -> Path:
    """A linked home under the temporary folder, removed when this process exits: CI's machine keeps /tmp from run
    to run, and each drill, soak and load run left its home there (441 MB over a few dozen runs)."""
    home = Path(tempfile.mkdtemp(prefix=f"zephyr-{name}-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return linked_home(home)


def linked_variant(home: Path, source: RegistryEntry, name: str, **manifest: Any) -> Path:
    """A registry entry `name` in `home` whose weights are links to `source`'s files and whose zephyr.json is its
    own (e.g. with an MCQ calibration record), so a test can change a manifest without touching the shared one."""
    folder = Registry(home / "models").path_of(name)  # checks the name before the folder is made
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.path.iterdir():
        if path.name != MANIFEST and not (folder / path.name).exists():
            (folder / path.name).symlink_to(path.resolve())
    record = source.manifest.model_copy(update={"name": name, "parent": None, **manifest})
    (folder / MANIFEST).write_text(record.model_dump_json(indent=2))
    return folder


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a server and every process below it: vLLM's EngineCore is a daemon child that outlives a SIGKILLed
    server (no parent-death watch), holding its weights and KV cache. The server stays in the caller's process group,
    so a job killed as a group (CI's time limit) still takes it."""
    for pid in [*descendants(process.pid), process.pid]:  # found before the parent dies and they are reparented
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


# Settings a shell may export for a real deployment that must not reach a server a benchmark or drill starts: its
# database and spill file (set per server), a second model's server for review candidates, a keys file.
NOT_INHERITED = ("ZEPHYR_DB_URL", "ZEPHYR_SPILL_PATH", "ZEPHYR_API_KEYS_FILE", "ZEPHYR_REVIEW_CANDIDATE_",
                 "ZEPHYR_LOG_RETENTION_DAYS")


def server_environment() -> dict[str, str]:
    """The caller's environment without NOT_INHERITED, for a server of a load test's own."""
    return {name: value for name, value in os.environ.items() if not name.startswith(NOT_INHERITED)}


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank: the smallest value with at least a share q of the values at or below it) of
    the values that are numbers; NaN if none is."""
    ordered = sorted(v for v in values if not math.isnan(v))
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else float("nan")


@dataclass
class LocalServer:
    process: subprocess.Popen
    url: str
    home: Path
    log_path: Path
    db_url: str

    @classmethod
    def start(cls, home: Path, **settings: str) -> LocalServer:
        """`zephyr serve` on a free port with the load keys; returns once /readyz answers 200. `settings` are
        extra ZEPHYR_* variables, e.g. DB_URL="postgresql+asyncpg://..."."""
        port = free_port()
        env = {
            **server_environment(),
            "ZEPHYR_HOME": str(home),
            # its own log, spill file and review queue, whatever the caller's shell exports: load-test chats are no
            # students' answers for a real database
            "ZEPHYR_DB_URL": f"sqlite+aiosqlite:///{home / 'zephyr.db'}",
            "ZEPHYR_SPILL_PATH": str(home / "spill" / "generations.jsonl"),
            "ZEPHYR_PORT": str(port),
            "ZEPHYR_API_KEYS": ",".join([f"student:{STUDENT_KEY}", f"admin:{ADMIN_KEY}",
                                          *(f"reviewer:{key}" for key in REVIEWER_KEYS)]),
            "ZEPHYR_MAX_MODEL_LEN": "2048",
            "ZEPHYR_MEMORY_SHARE": "0.3",
            "ZEPHYR_LOG_FLUSH_SECONDS": "0.05",
            "ZEPHYR_LOG_RETRY_SECONDS": "1",
            "ZEPHYR_DRAIN_SECONDS": "60",
            **{f"ZEPHYR_{name.upper()}": str(value) for name, value in settings.items()},
        }
        log_path = home / "server.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--log-level", "info"],
                                       env=env, stdout=log_file, stderr=subprocess.STDOUT)
        server = cls(process, f"http://127.0.0.1:{port}", home, log_path, env["ZEPHYR_DB_URL"])
        try:
            wait_ready(f"{server.url}/readyz", process, log_path, START_TIMEOUT_S)
        except ServerFailed:
            _kill_tree(process)
            raise
        _LOCAL_URLS.add(server.url)
        return server

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    def stop(self, keep_log: Path | None = None) -> int | None:
        """Stops the server; `keep_log`: where its log is copied, the run's evidence (its scratch home, and the log
        in it, is removed when the process exits)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                _kill_tree(self.process)
        _LOCAL_URLS.discard(self.url)
        if keep_log is not None and self.log_path.is_file():
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log_path, keep_log)
        return self.process.returncode

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its descendants (vLLM's EngineCore, and its worker)."""
        return sum(rss_bytes(pid) for pid in [self.process.pid, *descendants(self.process.pid)])

    def engine_core_pid(self) -> int:
        for pid in children(self.process.pid):
            try:
                if b"EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        raise ServerFailed("no EngineCore child process found")

    def log_row_counts(self, ids: Iterable[str]) -> dict[str, int]:
        return asyncio.run(_row_counts(self.db_url, list(ids)))

    def metric(self, name: str) -> float:
        """The sum of a Prometheus sample family from /metrics (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "))


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float) -> float:
    """Polls `url` until it answers 200; returns the seconds that took. The log's tail goes into the error."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise ServerFailed(f"{url}: exited with {process.returncode} while starting:\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise ServerFailed(f"{url}: not ready after {timeout}s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        below = [child for parent in frontier for child in children(parent)]
        found += below
        frontier = below
    return found


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def _row_counts(db_url: str, ids: list[str]) -> dict[str, int]:
    from sqlalchemy import func, select
    from sqlalchemy.ext.asyncio import create_async_engine

    from service.store.models import Generation

    engine = create_async_engine(db_url)
    counts: dict[str, int] = dict.fromkeys(ids, 0)
    try:
        async with engine.connect() as conn:
            for start in range(0, len(ids), 500):
                query = (select(Generation.id, func.count()).where(Generation.id.in_(ids[start:start + 500]))
                         .group_by(Generation.id))
                counts.update({row[0]: row[1] for row in await conn.execute(query)})
    finally:
        await engine.dispose()
    return counts


def load_keys(url: str) -> dict[str, str]:
    """The keys Locust's users send to `url`: the load keys for a server LocalServer started (it was given them,
    whatever the environment holds); for any other server (`--url`) ZEPHYR_LOAD_STUDENT_KEY and
    ZEPHYR_LOAD_REVIEWER_KEYS where the user set them, each falling back to the load keys."""
    keys = {"ZEPHYR_LOAD_STUDENT_KEY": STUDENT_KEY, "ZEPHYR_LOAD_REVIEWER_KEYS": ",".join(REVIEWER_KEYS)}
    if url.rstrip("/") in _LOCAL_URLS:
        return keys
    return {name: os.environ.get(name) or default for name, default in keys.items()}


@dataclass
class Locust:
    """A headless Locust run of loadtest/locustfile.py in a subprocess; its per-request events in a file."""

    process: subprocess.Popen
    events_path: Path

    @classmethod
    def start(cls, url: str, out: Path, users: int, seconds: float, spawn_rate: float = 8,
              user_classes: Iterable[str] = (), exam_period: float = 60) -> Locust:
        out.mkdir(parents=True, exist_ok=True)
        events_path = out / "events.jsonl"
        events_path.unlink(missing_ok=True)
        env = {**os.environ, **load_keys(url),
               "ZEPHYR_LOAD_EVENTS": str(events_path), "ZEPHYR_LOAD_EXAM_PERIOD": str(exam_period)}
        # -t 0s would be no limit at all (Locust reads it as unset), and wait() would wait forever
        command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", url, "--headless",
                   "-u", str(users), "-r", str(spawn_rate), "-t", f"{max(1, math.ceil(seconds))}s",
                   "--stop-timeout", "300",
                   "--csv", str(out / "locust"), "--html", str(out / "locust.html"), "--only-summary",
                   "--loglevel", "WARNING", *user_classes]
        with (out / "locust.log").open("w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        return cls(process, events_path)

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Locust's own stop: users finish their request in hand (up to --stop-timeout), reports get written."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(330)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]


@dataclass
class Report:
    """A drill's or soak run's checks, each with the figure it rests on; printed as a table."""

    title: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    figures: dict[str, object] = field(default_factory=dict)

    def check(self, name: str, passed: bool, figure: str) -> None:
        self.checks.append((name, bool(passed), figure))

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(passed for _, passed, _ in self.checks)

    def table(self) -> Table:
        table = Table(title=f"{self.title}: {'PASS' if self.passed else 'FAIL'}")
        table.add_column("check")
        table.add_column("result")
        table.add_column("figures")
        for name, passed, figure in self.checks:
            table.add_row(name, "[green]pass[/]" if passed else "[red]FAIL[/]", figure)
        return table

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(
            {"title": self.title, "passed": self.passed, "figures": self.figures,
             "checks": [{"name": n, "passed": p, "figure": f} for n, p, f in self.checks]}, indent=2, default=str))


def whole(event: dict) -> bool:
    """Whether the client saw a request succeed: a 200, for a stream its [DONE], and no error (a stream's failure
    after its headers comes as an in-band error event, then [DONE])."""
    return event["status"] == 200 and event["done"] and not event["error"]


def successful(events: list[dict], names: Iterable[str] = ("chat", "mcq")) -> list[dict]:
    """Generation requests the client saw succeed (`whole`)."""
    names = set(names)
    return [e for e in events if e["name"] in names and whole(e)]


def one_row_each(server: LocalServer, events: list[dict]) -> tuple[bool, str]:
    """Every successful generation request has exactly one row in the server's generation log."""
    ids = [e["id"] for e in successful(events)]
    counts = server.log_row_counts(ids)
    missing = sum(1 for n in counts.values() if n == 0)
    doubled = sum(1 for n in counts.values() if n > 1)
    no_id = sum(1 for i in ids if not i)
    return (bool(ids) and not missing and not doubled and not no_id,
            f"{len(ids)} successful requests: {missing} without a row, {doubled} with several, {no_id} without an id")
