"""How often a chat answer to a pasted multiple-choice question is right: a student pastes the question with its
lettered options into an ordinary chat client, and the tutor answers in free text. This sends benchmark questions
that way through a running server (`POST /v1/chat/completions`, the official `openai` client, the server's own
chat sampling with a fixed seed per question) and reads which option each answer commits to:

- the first option label it writes ("B)", "B.", "(B)", "answer is B"), else the one option whose text it names
  and no other's (`offline.benchmarks.answer_verdict`); neither: it commits to none;
- `contradicts`: after the first label, the answer names another option's label, or names another option's
  text and not its own (an answer that says "B) ... so the answer is C" reads as B, and contradicts);
- `looping` (`zephyr.textquality.loops`), and its length in words.

Run it once against a server with `ZEPHYR_CHAT_MCQ=false` and once with the default (true), each with `--out`,
then `--compare A.jsonl B.jsonl` pairs them over questions (`evals.stats.paired_bootstrap`). Choose on validation
splits; read test splits once.

    python -m tools.chat_mcq_probe --url http://127.0.0.1:8000 --api-key KEY \\
        --benchmarks arc_easy:validation,arc_challenge:validation,sciq:validation --limit 300 --out plain.jsonl
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from evals.stats import paired_bootstrap
from offline import benchmarks
from tools import check_out_folder
from zephyr.console import make_console
from zephyr.mcq import LETTERS
from zephyr.paths import write_text_atomic
from zephyr.schemas import MCQItem
from zephyr.settings import Settings
from zephyr.textquality import loops

app = typer.Typer(add_completion=False)
MAX_TOKENS = 128


def _label_pattern(after_letter: str) -> re.Pattern:
    """An option label: "(B)", "B" then one of `after_letter`, or "answer is B"."""
    return re.compile(rf"(?:\(([A-J])\)|\b([A-J])[{re.escape(after_letter)}](?=\s|$)|\banswer is:?\s*\(?([A-J])\b)")


_LABEL = _label_pattern(").:")
# After the answer commits to a label, only "B)" (not "B." or "B:") names another option: "Vitamin A." or "type A:"
# are words.
_SECOND_LABEL = _label_pattern(")")


def render(question: str, options: list[str]) -> str:
    """The question as a student pastes it: the stem, then one lettered option a line."""
    return question + "\n" + "\n".join(f"{letter}) {option}" for letter, option in zip(LETTERS, options, strict=False))


def labels(text: str, count: int, pattern: re.Pattern = _LABEL) -> list[tuple[int, str]]:
    """(where it ends, letter) of every option label the text writes, for the question's letters only."""
    found = []
    for m in pattern.finditer(text):
        letter = next(g for g in m.groups() if g)
        if letter in LETTERS[:count]:
            found.append((m.end(), letter))
    return found


def read_answer(text: str, options: list[str]) -> tuple[str | None, bool]:
    """The option the answer commits to (a letter, or None) and whether it goes on to contradict it."""
    found = labels(text, len(options))
    if found:
        end, letter = found[0]
        rest = text[end:].lstrip(")]. :")
        # the committed option's own text ("B) Vitamin A.") is no second label
        own = options[LETTERS.index(letter)].strip()
        unlabelled = rest[len(own):] if own and rest.lower().startswith(own.lower()) else rest
        other_label = any(other != letter for _, other in labels(unlabelled, len(options), _SECOND_LABEL))
        verdict = benchmarks.answer_verdict(rest, options, LETTERS.index(letter))
        return letter, other_label or verdict == "wrong"
    named = [i for i in range(len(options))
             if benchmarks.answer_verdict(text, options, i) == "right"]
    return (LETTERS[named[0]] if len(named) == 1 else None), False


def questions(specs: str, limit: int, seed: int, data_dir: Path) -> list[tuple[str, MCQItem]]:
    chosen = []
    for spec in specs.split(","):
        name, _, split = spec.partition(":")
        items = benchmarks.load(name, split, data_dir=data_dir)
        # A seeded sample, not the first N: a split's head can be one kind of question.
        items = random.Random(seed).sample(items, min(limit, len(items)))
        chosen += [(spec, item) for item in items]
    return chosen


async def ask_all(url: str, api_key: str, chosen: list[tuple[str, MCQItem]], concurrency: int,
                  max_tokens: int) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=api_key, max_retries=3, timeout=600)
    model = (await client.models.list()).data[0].id
    gate = asyncio.Semaphore(concurrency)
    from tqdm.asyncio import tqdm

    async def ask(spec: str, item: MCQItem) -> dict:
        async with gate:
            seed = int.from_bytes(item.id.encode()[-6:], "big") % 2**31
            reply = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": render(item.question, item.options)}],
                max_tokens=max_tokens, seed=seed)
        text = reply.choices[0].message.content or ""
        letter, contradicts = read_answer(text, item.options)
        return {"set": spec, "id": item.id, "key": item.answer, "answer": letter, "right": letter == item.answer,
                "committed": letter is not None, "contradicts": contradicts, "looping": loops(text),
                "words": len(text.split()), "ended": reply.choices[0].finish_reason == "stop", "text": text}

    return list(await tqdm.gather(*(ask(spec, item) for spec, item in chosen), desc="chats"))


def table(title: str, rows: list[dict], baseline: list[dict] | None = None) -> Table:
    out = Table(title=title)
    for column in ("set", "n", "right", "committed", "contradicts", "looping", "ended", "words"):
        out.add_column(column, justify="left" if column == "set" else "right")
    if baseline is not None:
        out.add_column("right vs baseline [95% CI]", justify="right")
    for spec in dict.fromkeys(r["set"] for r in rows):
        part = [r for r in rows if r["set"] == spec]
        shares = [f"{100 * sum(r[key] for r in part) / len(part):.1f}%"
                  for key in ("right", "committed", "contradicts", "looping", "ended")]
        cells = [spec, str(len(part)), *shares, f"{sum(r['words'] for r in part) / len(part):.0f}"]
        if baseline is not None:  # over the questions both files asked (another --limit or --seed asks others)
            base = {r["id"]: float(r["right"]) for r in baseline if r["set"] == spec}
            ours = {r["id"]: float(r["right"]) for r in part if r["id"] in base}
            if ours:
                delta = paired_bootstrap(ours, base)
                cells.append(f"{100 * delta.delta:+.1f} [{100 * delta.low:+.1f}, {100 * delta.high:+.1f}] "
                             f"(n {len(ours)})")
            else:
                cells.append("no question in common")
        out.add_row(*cells)
    return out


@app.command()
def main(
    url: Annotated[str, typer.Option(help="a running `zephyr serve`")] = "http://127.0.0.1:8000",
    api_key: Annotated[str, typer.Option(envvar="ZEPHYR_API_KEY", help="a student key")] = "",
    benchmark_specs: Annotated[str, typer.Option("--benchmarks", help="name:split,... (validation to choose, "
                                                 "test to report once)")] = "arc_easy:validation",
    limit: Annotated[int, typer.Option(help="questions per set, a seeded sample")] = 300,
    seed: Annotated[int, typer.Option(help="the sample's seed")] = 0,
    concurrency: Annotated[int, typer.Option(help="chats in flight")] = 16,
    max_tokens: Annotated[int, typer.Option(help="longest answer")] = MAX_TOKENS,
    out: Annotated[Path | None, typer.Option(help="write every answer as JSON lines")] = None,
    compare: Annotated[tuple[Path, Path] | None, typer.Option(help="BASELINE CANDIDATE: pair two --out files "
                                                               "instead of asking")] = None,
) -> None:
    console = make_console()
    if compare is not None:
        baseline, candidate = ([json.loads(line) for line in path.read_text().splitlines()] for path in compare)
        console.print(table(f"{compare[1].name} against {compare[0].name}", candidate, baseline))
        return
    check_out_folder(out)
    chosen = questions(benchmark_specs, limit, seed, Settings().data_dir)
    rows = asyncio.run(ask_all(url, api_key, chosen, concurrency, max_tokens))
    if out is not None:
        write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    console.print(table(f"pasted multiple-choice questions through {url}", rows))


if __name__ == "__main__":
    app()
