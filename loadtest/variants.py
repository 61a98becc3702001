"""Served speed and memory of registry variants (a quantized model against its parent), on this machine.

Each model is served by our server (`zephyr serve --model NAME`, the real vLLM engine), one at a time, with the
same engine arguments and a fixed KV cache, so resident memory differs only by what the model needs. After a
warm-up, streaming chats run at each concurrency; rounds alternate the model order so drift on a shared machine
hits all alike. The figures go into each model's evaluation results (suite "speed"), where
`zephyr eval report` puts them beside accuracy, and a table prints here. A script to run on demand
(`make bench-variants MODELS=a,b,c`), not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from rich.table import Table

from evals.results import EvalRun, ResultStore, SpeedRecord
from loadtest import harness
from loadtest.bench import Level, chat_level
from loadtest.harness import percentile
from zephyr.console import make_console
from zephyr.registry import Registry, RegistryError, check_name
from zephyr.settings import Settings

console = make_console()


class MemorySampler:
    """Peak and last resident memory of a process and all its children (vLLM's engine core and worker)."""

    def __init__(self, pid: int, every_s: float = 0.25):
        self.pid, self.every_s = pid, every_s
        self.peak = self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last = self.rss()
            self.peak = max(self.peak, self.last)
            time.sleep(self.every_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def serve(model: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "zephyr"), "serve", "--model", model, "--port", str(port)]
    with log.open("w") as handle:
        return subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def measure(model: str, args: argparse.Namespace, env: dict[str, str], out_dir: Path,
                  round_index: int) -> tuple[list[Level], dict[str, float]]:
    log = out_dir / f"{check_name(model)}.round{round_index}.log"
    port = args.port or harness.free_port()
    harness.refuse_served(port)
    url = f"http://127.0.0.1:{port}"
    process = serve(model, port, env, log)
    try:
        cold_start = harness.wait_ready(f"{url}/readyz", process, log, timeout=900)
        with MemorySampler(process.pid) as memory:
            idle_rss = memory.rss()
            for conc in args.concurrency:  # warm every batch shape before measuring
                await chat_level(model, url, conc, conc, 8, model=model)
            levels = []
            for conc in args.concurrency:
                level = await chat_level(model, url, conc, max(args.min_requests, conc * args.per_user),
                                         args.max_tokens, model=model)
                levels.append(level)
                console.print(f"round {round_index + 1} {model:42s} c={conc:<3d} {level.tok_s:7.1f} tok/s  "
                              f"p50 TTFT {percentile(level.ttft_s, 0.5) * 1000:6.0f} ms  "
                              f"p50 latency {percentile(level.latency_s, 0.5):5.2f} s  errors {level.errors}")
        return levels, {"cold_start_s": cold_start, "rss_idle_bytes": idle_rss, "rss_peak_bytes": memory.peak}
    finally:
        stop(process)


def summarise(levels: list[Level], memory: list[dict[str, float]]) -> SpeedRecord:
    """Median over rounds of each figure, per concurrency: what the eval results record as `speed`."""
    tok, ttft, p50, p95 = {}, {}, {}, {}
    for conc in sorted({lv.concurrency for lv in levels}):
        at = [lv for lv in levels if lv.concurrency == conc]
        tok[str(conc)] = round(statistics.median(lv.tok_s for lv in at), 1)
        # NaN where no request of a level streamed a token (all failed): round() without digits would raise
        ttft[str(conc)] = round(statistics.median(percentile(lv.ttft_s, 0.5) for lv in at) * 1000, 0)
        p50[str(conc)] = round(statistics.median(percentile(lv.latency_s, 0.5) for lv in at), 2)
        p95[str(conc)] = round(statistics.median(percentile(lv.latency_s, 0.95) for lv in at), 2)
    return SpeedRecord(tok_per_s=tok, ttft_p50_ms=ttft, latency_p50_s=p50, latency_p95_s=p95,
                       rss_peak_bytes=max(m["rss_peak_bytes"] for m in memory),
                       rss_idle_bytes=statistics.median(m["rss_idle_bytes"] for m in memory),
                       cold_start_s=round(statistics.median(m["cold_start_s"] for m in memory), 1))


def save(model: str, registry: Registry, settings: Settings, speed: SpeedRecord, args: argparse.Namespace,
         session: str) -> Path:
    entry = registry.get(model)
    # The report sets speeds against each other only within one session.
    speed = speed.model_copy(update={"session": session})
    run = EvalRun.of_entry(entry, "speed", speed=speed,
                           engine={"server": "zephyr serve", "kv_cache_gib": args.kv_cache_gib,
                                   "max_tokens": args.max_tokens, "rounds": args.rounds,
                                   "enforce_eager": settings.enforce_eager, "cpus": os.cpu_count(),
                                   "block_size": settings.block_size,
                                   "cpu_reserved_cores": settings.cpu_reserved_cores_in_effect})
    return ResultStore(settings.resolved_eval_results_dir).save(run)


def table(results: dict[str, SpeedRecord], concurrency: list[int], base: str) -> Table:
    out = Table(title="Served by zephyr serve on this machine (median of rounds)")
    out.add_column("model")
    out.add_column("RSS peak", justify="right")
    for conc in concurrency:
        out.add_column(f"tok/s c={conc}", justify="right")
        out.add_column(f"x {base}", justify="right")
        out.add_column(f"p50 latency c={conc}", justify="right")
    for model, speed in results.items():
        row = [model, f"{(speed.rss_peak_bytes or 0) / 2**30:.2f} GiB"]
        for conc in concurrency:
            tok = speed.tok_per_s[str(conc)]
            row += [f"{tok:.1f}", f"{tok / results[base].tok_per_s[str(conc)]:.2f}x",
                    f"{speed.latency_p50_s[str(conc)]:.2f} s"]
        out.add_row(*row)
    return out


async def run(args: argparse.Namespace) -> None:
    settings = Settings()
    registry = Registry(settings.models_dir)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    session = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**harness.server_environment(), "ZEPHYR_KV_CACHE_GIB": str(args.kv_cache_gib), "ZEPHYR_API_KEYS": "",
           "ZEPHYR_RATE_LIMIT": "1000000/minute", "ZEPHYR_REVIEW_POLICY": "off",
           "ZEPHYR_HOME": str(settings.home), "ZEPHYR_DB_URL": f"sqlite+aiosqlite:///{out_dir / 'bench.db'}",
           # not the home's own spill file: a real server's spilled rows would be replayed into bench.db, and ours
           # into the real log
           "ZEPHYR_SPILL_PATH": str(out_dir / "spill" / "generations.jsonl")}
    levels: dict[str, list[Level]] = {m: [] for m in models}
    memory: dict[str, list[dict]] = {m: [] for m in models}
    for round_index in range(args.rounds):
        for model in models if round_index % 2 == 0 else reversed(models):
            got, mem = await measure(model, args, env, out_dir, round_index)
            levels[model] += got
            memory[model].append(mem)
    failed = {m: sum(lv.errors for lv in levels[m]) for m in models}
    for model in [m for m in models if failed[m]]:
        console.print(f"[red]{model}: {failed[model]} requests failed; its figures would time only the ones that "
                      f"survived, so no speed is recorded for it (its server log is in {args.out})[/]")
    results = {m: summarise(levels[m], memory[m]) for m in models}
    for model in [m for m in models if not failed[m]]:
        path = save(model, registry, settings, results[model], args, session)
        console.print(f"{model}: speed recorded in {path}")
    console.print(table(results, args.concurrency, models[0]))
    if any(failed.values()):
        raise SystemExit(1)
    console.print("Accuracy beside these figures: zephyr eval report --models " + ",".join(models))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="comma-separated registry models; the first is the baseline")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per model, alternating the model order")
    parser.add_argument("--per-user", type=int, default=2, help="requests per concurrent user per level")
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="the same fixed KV cache for every model")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--out", default="bench-results/variants")
    args = parser.parse_args()
    registry = Registry(Settings().models_dir)
    try:  # an unknown or malformed name fails now, in words, not after the first model's rounds
        for model in (m.strip() for m in args.models.split(",") if m.strip()):
            registry.get(model)
    except RegistryError as exc:
        parser.error(str(exc))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
