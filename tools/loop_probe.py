"""Why does a trained entry loop, or stop looping? Read it from log-probabilities, without generating: each GSM8K
*training* question is asked as the text suite asks it (`evals.gsm8k.messages_for`, no demonstrations), its
reference answer (`evals.gsm8k.shot_solution`) is teacher-forced after it, and then a verbatim copy of the answer's
first line twice. Per model it prints (docs/training.md, "What DPO changes that ends the loops"):

- the log-probability of the end of turn right after the complete answer (median, and the mean probability): a
  model that loops has stopped ending its answers;
- the per-token log-probability of a first repeat of the first line, and of a second one given the first (whether a
  repeat, once started, locks in);
- with `--pairs`, the per-token log-probability of each plain-text pair's chosen and rejected continuation (what
  preference training pushes apart, and, through likelihood displacement, down).

    python -m tools.loop_probe --models smollm2-135m-instruct,smollm2-135m-sft-cloze --pairs data/cloze-dpo.jsonl

One fp32 forward pass per answer and per continuation, in transformers on the CPU: 200 answers and 200 pairs take
about 1.5 min a model on 2 cores. Training data only: nothing it reads is a split any report measures."""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from tqdm import tqdm

from evals import gsm8k
from offline import benchmarks
from offline.benchmarks import GSM8KItem
from zephyr.console import make_console
from zephyr.mcq import cloze_split
from zephyr.prompts import encode_chat
from zephyr.registry import Registry, RegistryError
from zephyr.schemas import TextPreferencePair, read_jsonl
from zephyr.settings import Settings


@dataclass(frozen=True)
class AnswerCase:
    prefix: list[int]  # the chat prompt, then the complete reference answer
    copy: list[int]  # a newline and the answer's first line again


@dataclass(frozen=True)
class PairCase:
    chosen: tuple[list[int], int]  # cloze_split of prompt + chosen: the ids and where the continuation starts
    rejected: tuple[list[int], int]


@dataclass(frozen=True)
class ProbeFigures:
    model: str
    answers: int
    end_logprob_median: float
    end_probability_mean: float
    first_repeat_per_token: float
    second_repeat_per_token: float
    pairs: int
    chosen_per_token: float | None
    rejected_per_token: float | None


def answer_cases(tokenizer: Any, items: list[GSM8KItem], system_prompt: str | None) -> list[AnswerCase]:
    cases = []
    for item in items:
        answer = gsm8k.shot_solution(item)
        prefix = (encode_chat(tokenizer, gsm8k.messages_for(item, system_prompt, []))
                  + tokenizer.encode(answer, add_special_tokens=False))
        first_line = answer.split("\n")[0].strip()
        cases.append(AnswerCase(prefix, tokenizer.encode("\n" + first_line, add_special_tokens=False)))
    return cases


def read_pairs(path: Path, limit: int | None) -> list[TextPreferencePair]:
    """The first `limit` plain-text pairs of a JSON Lines file (`zephyr data cloze`'s DPO pairs)."""
    return list(itertools.islice(read_jsonl(path, TextPreferencePair), limit))


def pair_cases(tokenizer: Any, pairs: list[TextPreferencePair]) -> list[PairCase]:
    cases = [PairCase(cloze_split(tokenizer, p.prompt, p.chosen), cloze_split(tokenizer, p.prompt, p.rejected))
             for p in pairs]
    for number, case in enumerate(cases, 1):
        if any(len(ids) <= context_length for ids, context_length in (case.chosen, case.rejected)):
            raise ValueError(f"pair {number}: a continuation with no tokens of its own has no likelihood to read")
    return cases


def end_of_turn_id(tokenizer: Any) -> int:
    """The token the chat template ends an assistant turn with, where it is the tokenizer's EOS (the token a served
    answer stops at); other templates are refused rather than read at the wrong token."""
    marker = "zephyr-loop-probe"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    if tokenizer.eos_token is None or marker + tokenizer.eos_token not in rendered:
        raise ValueError("the chat template does not end an answer with the tokenizer's EOS token; this probe reads "
                         "the end of turn as that token")
    return tokenizer.eos_token_id


def next_token_logprobs(model: Any, ids: list[int]) -> Any:
    """Row i: the log-probabilities of the token after ids[: i + 1], over the whole vocabulary."""
    import torch

    logits = model(torch.tensor([ids], device=model.device)).logits[0].float()
    return torch.log_softmax(logits, dim=-1).cpu()


def mean_logprob(logprobs: Any, ids: list[int], start: int, stop: int) -> float:
    """The mean log P(ids[i] | ids[:i]) over start <= i < stop: a span's per-token log-likelihood."""
    import torch

    return logprobs[start - 1: stop - 1].gather(1, torch.tensor(ids[start:stop])[:, None]).mean().item()


def probe_model(name: str, model: Any, end_id: int, answers: list[AnswerCase], pairs: list[PairCase]) -> ProbeFigures:
    import torch

    end, first, second, chosen, rejected = [], [], [], [], []
    with torch.inference_mode():
        for case in tqdm(answers, desc=f"{name} answers"):
            ids = case.prefix + case.copy + case.copy
            logprobs = next_token_logprobs(model, ids)
            answered, repeated = len(case.prefix), len(case.prefix) + len(case.copy)
            end.append(logprobs[answered - 1, end_id].item())
            first.append(mean_logprob(logprobs, ids, answered, repeated))
            second.append(mean_logprob(logprobs, ids, repeated, len(ids)))
        for case in tqdm(pairs, desc=f"{name} pairs"):
            for sink, (ids, context_length) in ((chosen, case.chosen), (rejected, case.rejected)):
                sink.append(mean_logprob(next_token_logprobs(model, ids), ids, context_length, len(ids)))
    return ProbeFigures(
        model=name, answers=len(answers), end_logprob_median=statistics.median(end),
        end_probability_mean=statistics.fmean(math.exp(x) for x in end),
        first_repeat_per_token=statistics.fmean(first), second_repeat_per_token=statistics.fmean(second),
        pairs=len(pairs), chosen_per_token=statistics.fmean(chosen) if chosen else None,
        rejected_per_token=statistics.fmean(rejected) if rejected else None)


def probe(model_paths: dict[str, Path], items: list[GSM8KItem], pairs: list[TextPreferencePair],
          system_prompt: str | None) -> list[ProbeFigures]:
    """Every model is read with the first model's tokenizer: the cases must be the same token ids for all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first, *others = model_paths.items()
    tokenizer = AutoTokenizer.from_pretrained(first[1])
    vocabulary = tokenizer.get_vocab()
    for name, path in others:  # before any model is read: one tokenizer's ids are fed to all
        if AutoTokenizer.from_pretrained(path).get_vocab() != vocabulary:
            raise ValueError(f"{name}'s tokenizer differs from {first[0]}'s: probe models that share one")
    end_id = end_of_turn_id(tokenizer)
    answers = answer_cases(tokenizer, items, system_prompt)
    cloze = pair_cases(tokenizer, pairs)
    out = []
    for name, path in model_paths.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out.append(probe_model(name, model, end_id, answers, cloze))
        del model
    return out


def main(
    models: Annotated[str, typer.Option(help="registry models, comma-separated, sharing one tokenizer")],
    limit: Annotated[int, typer.Option(min=1, max=7473, help="the first N GSM8K training answers (and pairs)")] = 200,
    pairs: Annotated[Path | None, typer.Option(
        help="plain-text preference pairs (JSON Lines, `zephyr data cloze --out`): also probe their chosen and "
             "rejected continuations", exists=True, dir_okay=False)] = None,
    out: Annotated[Path | None, typer.Option(help="also write the figures here as JSON", dir_okay=False)] = None,
) -> None:
    if out is not None and not out.parent.is_dir():
        raise typer.BadParameter(f"the folder {out.parent} does not exist", param_hint="--out")
    names = [name.strip() for name in models.split(",") if name.strip()]
    if not names or len(set(names)) != len(names):
        raise typer.BadParameter("name each registry model once, comma-separated", param_hint="--models")
    settings = Settings()
    registry = Registry(settings.models_dir)
    try:
        paths = {name: registry.get(name).path for name in names}
    except RegistryError as exc:
        raise typer.BadParameter(str(exc), param_hint="--models") from exc
    try:
        pair_rows = read_pairs(pairs, limit) if pairs is not None else []
    except ValueError as exc:  # schemas.DataFileError names the file and line
        raise typer.BadParameter(str(exc), param_hint="--pairs") from exc
    try:
        items = benchmarks.load("gsm8k", split="train", data_dir=settings.data_dir, limit=limit)
    except benchmarks.DatasetError as exc:
        raise typer.BadParameter(str(exc), param_hint="ZEPHYR_DATA_DIR (GSM8K's training split)") from exc
    system = settings.served_system_prompt
    started = time.perf_counter()
    try:
        figures = probe(paths, items, pair_rows, system)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--models / --pairs") from exc
    table = Table(title=f"loop probe: {len(items)} GSM8K training answers, {len(pair_rows)} pairs, teacher-forced "
                        f"({time.perf_counter() - started:.0f} s)")
    for column in ("model", "log P(end) after the answer, median", "P(end), mean", "first repeat, per token",
                   "second repeat, per token", "chosen, per token", "rejected, per token"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for f in figures:
        table.add_row(f.model, f"{f.end_logprob_median:.3f}", f"{f.end_probability_mean:.3f}",
                      f"{f.first_repeat_per_token:.3f}", f"{f.second_repeat_per_token:.3f}",
                      "" if f.chosen_per_token is None else f"{f.chosen_per_token:.3f}",
                      "" if f.rejected_per_token is None else f"{f.rejected_per_token:.3f}")
    make_console().print(table)
    if out is not None:
        out.write_text(json.dumps({"limit": limit, "pairs_file": str(pairs) if pairs else None,
                                   "figures": [asdict(f) for f in figures]}, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
