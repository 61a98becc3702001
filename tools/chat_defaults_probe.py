"""Which sampling should a chat get when its client sends none? Most chat clients send no `temperature`, and OpenAI's
default of 1.0 was the server's too: a 135M model sampled at 1.0 wanders. This asks SciQ questions as a student would
(the text suite's prompt: the tutor's system prompt, then the bare question, up to 128 new tokens) under several
sampling settings and reads each answer against the question's options:

- right / wrong: `offline.benchmarks.answer_verdict`, the text suite's `names_key` / `names_distractor`: the answer
  names the key's text and no distractor's / a distractor's and not the key's (words, case and punctuation aside);
- looping: `zephyr.textquality.loops`, the rule the gate and the metrics use;
- ended: it stopped on its own before the token limit; and its length in words.

Each setting is compared with the first by a paired bootstrap over questions (`evals.stats.paired_bootstrap`).
Choose on `--split validation` (SciQ valid); read `--split test` once for the setting chosen.

    python -m tools.chat_defaults_probe --split validation --limit 500 \\
        --settings 1.0/1.0/1.0,0.7/0.9/1.0,0.3/0.9/1.0,0/1.0/1.0,0.3/0.9/1.1

Each setting is temperature/top_p/repetition_penalty. `--model A,B` asks each model in turn (a trained entry against
its parent, paired over the same questions). The engine's seed fixes the draws, so a rerun repeats them.
One in-process vLLM engine: about 12 min for 300 questions a setting on 2 AVX2 cores (no AVX-512)."""

from __future__ import annotations

import json
import time
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
from zephyr.prompts import encode_chat
from zephyr.registry import Registry
from zephyr.settings import DEFAULT_MODEL, Settings
from zephyr.textquality import loops

MAX_TOKENS = 128

app = typer.Typer(add_completion=False)


def parse_settings(text: str) -> list[tuple[float, float, float]]:
    """`temperature/top_p/repetition_penalty,...`; a typer.BadParameter naming the part that is not."""
    out = []
    for part in text.split(","):
        try:
            temperature, top_p, penalty = (float(x) for x in part.split("/"))
        except ValueError:
            raise typer.BadParameter(f"{part!r} is not temperature/top_p/repetition_penalty (three numbers)",
                                     param_hint="--settings") from None
        out.append((temperature, top_p, penalty))
    return out


@app.command()
def main(
    models: Annotated[str, typer.Option("--model", help="registry model, or several comma-separated (each setting "
                                        "is asked of each model; the first model's first setting is the baseline)")]
    = DEFAULT_MODEL,
    split: Annotated[str, typer.Option(help="validation to choose, test to report once")] = "validation",
    limit: Annotated[int, typer.Option(help="the first N questions that have a passage")] = 500,
    settings_list: Annotated[str, typer.Option("--settings", help="temperature/top_p/repetition_penalty,...; "
                                               "the first is the baseline")] = "1.0/1.0/1.0,0.3/0.9/1.0",
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path | None, typer.Option(help="write every answer and figure here (JSON)")] = None,
) -> None:
    from vllm import SamplingParams, TokensPrompt

    from offline.engine import OfflineEngine

    console = make_console()
    check_out_folder(out)
    asked = parse_settings(settings_list)  # before any engine loads
    settings = Settings()
    names = [m.strip() for m in models.split(",") if m.strip()]
    entries = [Registry(settings.models_dir).get(name) for name in names]  # every name checked before any engine
    items = [i for i in benchmarks.load("sciq", split, data_dir=settings.data_dir) if i.support][:limit]
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt_enabled else []
    results = []
    for name, entry in zip(names, entries, strict=True):
        engine = OfflineEngine(entry.path, settings)
        prompts = [TokensPrompt(prompt_token_ids=encode_chat(engine.tokenizer, system + [
            {"role": "user", "content": item.question}])) for item in items]
        try:
            for temperature, top_p, penalty in asked:
                # The engine's seed (ZEPHYR_SEED) fixes the draws; a seed per request would sample one request at a
                # time.
                params = SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, top_p=top_p,
                                        repetition_penalty=penalty)
                started = time.perf_counter()
                outputs = engine.llm.generate(prompts, params, use_tqdm=True)
                answers = [o.outputs[0] for o in outputs]
                verdicts = {item.id: benchmarks.answer_verdict(a.text, item.options, LETTERS.index(item.answer))
                            for item, a in zip(items, answers, strict=True)}
                pairs = list(zip(items, answers, strict=True))
                results.append({
                    "setting": (f"{name} " if len(names) > 1 else "") +
                               f"T={temperature:g} top_p={top_p:g} rep={penalty:g}",
                    "model": name,
                    "sampling": [temperature, top_p, penalty],
                    "seconds": time.perf_counter() - started,
                    "right": {i: float(v == "right") for i, v in verdicts.items()},
                    "wrong": {i: float(v == "wrong") for i, v in verdicts.items()},
                    "looping": {item.id: float(loops(a.text)) for item, a in pairs},
                    "ended": {item.id: float(a.finish_reason == "stop") for item, a in pairs},
                    "words": {item.id: float(len(a.text.split())) for item, a in pairs},
                    "answers": {item.id: a.text for item, a in pairs},
                })
        finally:
            engine.shutdown()
            del engine

    def baseline(result: dict) -> dict:
        """One model: its first setting. Several: the first model under the same setting."""
        if len(names) == 1:
            return results[0]
        return next(r for r in results if r["model"] == names[0] and r["sampling"] == result["sampling"])

    against = "its first setting" if len(names) == 1 else f"{names[0]} under the same setting"
    table = Table(title=f"{', '.join(names)}: SciQ {split}, first {len(items)} questions with a passage, as chat "
                        f"(up to {MAX_TOKENS} tokens); deltas against {against} [95% paired bootstrap]")
    for column in ("setting", "right", "wrong", "looping", "ended", "words"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for result in results:
        cells = [result["setting"]]
        for metric in ("right", "wrong", "looping", "ended"):
            mean = sum(result[metric].values()) / len(items)
            cell = f"{mean:.1%}"
            base = baseline(result)
            if result is not base:
                d = paired_bootstrap(result[metric], base[metric], seed=seed)
                cell += f" ({d.delta * 100:+.1f} [{d.low * 100:+.1f}, {d.high * 100:+.1f}])"
            cells.append(cell)
        cells.append(f"{sum(result['words'].values()) / len(items):.0f}")
        table.add_row(*cells)
    console.print(table)
    if out is not None:
        write_text_atomic(out, json.dumps({"models": names, "split": split, "n": len(items), "results": results},
                                          indent=1))
        console.print(f"wrote {out}")


if __name__ == "__main__":
    app()
