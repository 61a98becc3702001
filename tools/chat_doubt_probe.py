"""Could the tutor tell, from its own outputs, when a free-form chat answer is likely wrong? A tutor that is honest
about doubt needs such a signal before it can hedge. This asks benchmark questions *without* their options through
a running server (`POST /v1/chat/completions`): once greedy with token log-probabilities, and `--samples` times
sampled. Each greedy answer is read against the question's options (`offline.benchmarks.answer_verdict`: `right`
names the key's text and no distractor's), and two signals a server could compute without the options are scored
by how well they rank right answers above the rest (AUC, with a bootstrap interval over questions):

- `mean_logprob`: the greedy answer's mean token log-probability (free: it comes with the answer);
- `agreement`: the mean Jaccard overlap of content words (the question's own words and stop words aside) between
  the greedy answer and each sampled one: self-consistency, at `--samples` times the generation.

Validation splits only; the findings are in docs/evaluation.md ("Doubt in free chat").

    python -m tools.chat_doubt_probe --url http://127.0.0.1:8000 --api-key KEY \\
        --benchmark sciq:validation --limit 300 --samples 6 --out doubt.jsonl
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import typer
from rich.table import Table
from scipy.stats import mannwhitneyu

from offline import benchmarks
from tools import check_out_folder
from zephyr.console import make_console
from zephyr.mcq import LETTERS
from zephyr.paths import write_text_atomic
from zephyr.schemas import MCQItem
from zephyr.settings import Settings

app = typer.Typer(add_completion=False)
STOP_WORDS = frozenset(
    "the a an of and or to in is are was were be been it its this that these those for on with as by at from which "
    "what who how why when where do does did can will would should could has have had not no but so than then there "
    "their they he she we you your our my me us them his her also into about more most other some such only over very "
    "just like may might must each all any both many much one two three".split())


def content_words(text: str, question: str) -> set[str]:
    """What an answer says beyond the question: its words of three letters or more, stop words and the question's
    own words aside."""
    asked = set(benchmarks.normalize_words(question))
    return {w for w in benchmarks.normalize_words(text) if len(w) > 2 and w not in STOP_WORDS and w not in asked}


def agreement(answer: str, samples: list[str], question: str) -> float:
    """Mean Jaccard overlap of the answer's content words with each sample's (0 when there are none to compare)."""
    said = content_words(answer, question)
    overlaps = [len(said & other) / len(said | other) if said | other else 0.0
                for other in (content_words(s, question) for s in samples)]
    return float(np.mean(overlaps)) if overlaps else 0.0


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The chance that a random positive scores above a random negative (ties count half): Mann-Whitney's U over
    the number of pairs."""
    positive, negative = scores[labels], scores[~labels]
    if not len(positive) or not len(negative):
        return math.nan
    return float(mannwhitneyu(positive, negative).statistic / (len(positive) * len(negative)))


def auc_interval(labels: np.ndarray, scores: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    drawn = [auc(labels[i], scores[i]) for i in (rng.integers(0, len(labels), len(labels)) for _ in range(resamples))]
    low, high = np.nanpercentile(drawn, [2.5, 97.5])
    return float(low), float(high)


async def ask(client: httpx.AsyncClient, item: MCQItem, samples: int, max_tokens: int) -> dict:
    messages = [{"role": "user", "content": item.question}]
    greedy = await client.post("/v1/chat/completions", json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0, "logprobs": True})
    greedy.raise_for_status()
    choice = greedy.json()["choices"][0]
    sampled = await client.post("/v1/chat/completions", json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.95, "n": samples, "seed": 7})
    sampled.raise_for_status()
    answer = choice["message"]["content"]
    return {"id": item.id, "answer": answer, "finish_reason": choice["finish_reason"],
            "verdict": benchmarks.answer_verdict(answer, item.options, LETTERS.index(item.answer)),
            "mean_logprob": float(np.mean([t["logprob"] for t in choice["logprobs"]["content"]] or [0.0])),
            "samples": [c["message"]["content"] for c in sampled.json()["choices"]]}


async def probe(url: str, api_key: str, items: list[MCQItem], samples: int, max_tokens: int) -> list[dict]:
    from rich.progress import track

    limit = asyncio.Semaphore(4)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=900) as client:
        async def one(item: MCQItem) -> dict:
            async with limit:
                return await ask(client, item, samples, max_tokens)

        tasks = [asyncio.ensure_future(one(item)) for item in items]
        for task in track(asyncio.as_completed(tasks), total=len(tasks), description="asking"):
            await task
        return [task.result() for task in tasks]


@app.command()
def main(
    url: Annotated[str, typer.Option(help="A running `zephyr serve`")] = "http://127.0.0.1:8000",
    api_key: Annotated[str, typer.Option(envvar="ZEPHYR_API_KEY")] = "",
    benchmark: Annotated[str, typer.Option(help="name:split, a validation split")] = "sciq:validation",
    limit: Annotated[int, typer.Option(min=10, max=10_000)] = 300,
    samples: Annotated[int, typer.Option(min=2, max=16)] = 6,
    max_tokens: Annotated[int, typer.Option(min=8, max=1024)] = 96,
    out: Annotated[Path | None, typer.Option(help="Keep every answer (JSONL)")] = None,
) -> None:
    check_out_folder(out)
    name, _, split = benchmark.partition(":")
    items = benchmarks.load(name, split or "validation", data_dir=Settings().data_dir, limit=limit)
    rows = asyncio.run(probe(url, api_key, items, samples, max_tokens))
    for row, item in zip(rows, items, strict=True):
        row["agreement"] = agreement(row["answer"], row["samples"], item.question)
    if out:
        write_text_atomic(out, "".join(json.dumps(row) + "\n" for row in rows))
    right = np.array([row["verdict"] == "right" for row in rows])
    console = make_console()
    verdicts = {v: sum(row["verdict"] == v for row in rows) for v in benchmarks.ANSWER_VERDICTS}
    console.print(f"{benchmark}, {len(rows)} answers: " + ", ".join(f"{v} {n}" for v, n in verdicts.items()))
    table = Table(title="How well each signal ranks right answers first")
    for column in ("signal", "AUC", "95% CI", "right: top half", "bottom half"):
        table.add_column(column, justify="left" if column == "signal" else "right")
    for signal in ("mean_logprob", "agreement"):
        scores = np.array([row[signal] for row in rows])
        low, high = auc_interval(right, scores)
        order = np.argsort(-scores, kind="stable")
        half = len(order) // 2
        table.add_row(signal, f"{auc(right, scores):.3f}", f"[{low:.3f}, {high:.3f}]",
                      f"{right[order[:half]].mean():.1%}", f"{right[order[half:]].mean():.1%}")
    console.print(table)


if __name__ == "__main__":
    app()
