"""A quick probe, before paying for a full run: can the model learn to map a question to its key's letter from
these direct (one-letter) pairs at all? A TRL DPO step forwards chosen and rejected sequences through policy and
reference; when both answers are a single letter after the same prompt, one forward of the prompt gives both
letters' log-probabilities, so the same objective costs a quarter of the compute. LoRA as in the recipes.

    python -m tools.letter_probe --data data/science-dpo.jsonl --objective dpo --lr 1e-4 --steps 120

With `--splits` instead of `--data` it asks the question without any pair data: SFT on the key's letter over MCQ
training splits, each question's options shuffled afresh at every draw, so the key's letter is uniform and a
letter prior cannot lower the loss (`--full` trains every weight instead of a LoRA adapter; a CUDA GPU is used
when there is one):

    python -m tools.letter_probe --splits arc_easy:train,openbookqa:train --lr 1e-3 --steps 300

It prints, every `--eval-every` steps, letter-format accuracy on the first `--eval-limit` questions of a
benchmark's validation split (`--eval-split`; a probe's figures choose steps and objectives, so it reads no test
split unless asked: the figures in docs/training.md before 2026-12-04 were read on test) in the prompt and letters
of `zephyr.mcq` (as `evals.hf_letter`), the predicted-letter
counts, and how often held-out pairs put the chosen letter above the rejected one."""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from tqdm import tqdm

from evals.hf_letter import left_padded, letter_logprobs
from offline import benchmarks
from offline.benchmarks import SourceError, check_mcq_sources, mcq_training_items
from zephyr import mcq
from zephyr.console import make_console
from zephyr.registry import Registry, RegistryError
from zephyr.settings import Settings

OBJECTIVES = ("dpo", "sft")


@dataclass
class Checkpoint:
    step: int
    accuracy: float
    held_out_accuracy: float  # pairs: chosen letter above rejected; splits: letter accuracy on unseen questions
    predicted: dict[str, int] = field(default_factory=dict)
    train_loss: float | None = None


def direct_pairs(path: Path) -> list[dict[str, Any]]:
    """The pairs whose chosen and rejected answers are each one option letter (`zephyr data science`'s direct
    pairs); explanation pairs are left out, they need the full sequence."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            row = json.loads(line)
            try:
                chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
            except (KeyError, IndexError, TypeError) as exc:
                raise ValueError(f"line {number} is not a preference pair with chosen and rejected messages "
                                 f"({type(exc).__name__}: {exc})") from exc
            if len(chosen) == 1 and len(rejected) == 1 and chosen in mcq.LETTERS and rejected in mcq.LETTERS:
                rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no pairs whose answers are single option letters")
    return rows


def permuted(item: Any, rng: random.Random) -> tuple[mcq.MCQuestion, int]:
    """The question with its options in a fresh random order (and its passage, as /mcq asks a SciQ question), and
    the index of the key among them."""
    order = list(range(len(item.options)))
    rng.shuffle(order)
    options = tuple(item.options[i] for i in order)
    question = mcq.MCQuestion(item.question, options, mcq.normalize_support(item.support))
    return question, order.index(mcq.LETTERS.index(item.answer))


def _load(model_path: Path, full: bool, lora_r: int, dropout: float) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # On CUDA, SDPA returns NaN for the fully masked rows of left padding, and NaN times a zero mask still
    # poisons the gradients; the eager kernels mask with a large finite number instead.
    extra = {"attn_implementation": "eager"} if device == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, **extra).to(device)
    if not full:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model, AutoTokenizer.from_pretrained(model_path)


def _score(model: Any, tokenizer: Any, items: list[Any], desc: str) -> tuple[float, dict[str, int]]:
    """Letter-format accuracy (the prompt and letters of `zephyr.mcq`) and how often each letter was answered."""
    import torch

    model.eval()
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
        scored = letter_logprobs(model, tokenizer, items, desc=desc)
    model.train()
    answers = [mcq.letter_distribution(mcq.LETTERS[: len(item.options)], logps)[1]
               for item, logps in zip(items, scored, strict=True)]
    correct = sum(a == item.answer for a, item in zip(answers, items, strict=True))
    return correct / len(items), dict(Counter(answers).most_common())


def key_probe(model_path: Path, train_items: list[Any], eval_items: list[Any], *, lr: float = 1e-3,
              steps: int = 300, batch_size: int = 8, eval_every: int = 100, held_out: int = 200,
              full: bool = False, lora_r: int = 16, seed: int = 0) -> list[Checkpoint]:
    """SFT on the key's letter, options permuted at every draw; the loss is cross-entropy over the question's
    option letters, so a model that has learnt nothing sits at ln(number of options). `held_out` training
    questions are never trained on and are scored like the benchmark (the column `held-out accuracy`)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = random.Random(seed)
    items = list(train_items)
    rng.shuffle(items)
    held, train = items[:held_out], items[held_out:]
    if not train:
        raise ValueError(f"no training questions left after {held_out} held out")
    model, tokenizer = _load(model_path, full, lora_r, dropout=0.0)
    letter_ids = mcq.letter_token_ids(tokenizer, len(mcq.LETTERS))

    def checkpoint(step: int, train_loss: float | None) -> Checkpoint:
        accuracy, predicted = _score(model, tokenizer, eval_items, f"step {step}")
        held_accuracy = _score(model, tokenizer, held, f"step {step}, held out")[0] if held else float("nan")
        return Checkpoint(step, accuracy, held_accuracy, predicted, train_loss)

    device = model.device

    def batch_loss(step: int) -> Any:
        drawn = [permuted(train[((step - 1) * batch_size + j) % len(train)], rng) for j in range(batch_size)]
        inputs, mask, positions = (t.to(device) for t in left_padded(
            [mcq.encode_prompt(tokenizer, question) for question, _ in drawn], tokenizer))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                           logits_to_keep=1).logits[:, -1].float()
        return torch.stack([F.cross_entropy(row[letter_ids[: len(question.options)]][None],
                                            torch.tensor([key], device=device))
                            for row, (question, key) in zip(logits, drawn, strict=True)]).mean()

    return _train(model, batch_loss, checkpoint, lr=lr, steps=steps, eval_every=eval_every,
                  warmup=max(1, min(20, steps // 10)), weight_decay=0.0, desc="key probe (permuted options)")


def _train(model: Any, batch_loss: Any, checkpoint: Any, *, lr: float, steps: int, eval_every: int, warmup: int,
           weight_decay: float, desc: str) -> list[Checkpoint]:
    """AdamW with linear warm-up and cosine decay over `steps`; a checkpoint before training, every `eval_every`
    steps and at the end, each with the mean loss since the one before."""
    import torch

    results = [checkpoint(0, None)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses: list[float] = []
    last = 0  # the step of the checkpoint before: each reports the mean loss of the steps since it
    for step in tqdm(range(1, steps + 1), desc=desc):
        loss = batch_loss(step)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            recent, last = losses[last:], step
            results.append(checkpoint(step, sum(recent) / len(recent)))
    return results


def pair_loss(objective: str, chosen: Any, rejected: Any, ref_chosen: Any, ref_rejected: Any,
              beta: float) -> Any:
    """DPO's sigmoid loss on the letters' log-probabilities, or SFT's negative log-likelihood of the chosen one."""
    import torch.nn.functional as F

    if objective == "dpo":
        return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    return -chosen.mean()


def probe(model_path: Path, pairs: list[dict[str, Any]], eval_items: list[Any], *, objective: str = "dpo",
          lr: float = 1e-4, beta: float = 0.1, steps: int = 120, batch_size: int = 8, eval_every: int = 60,
          held_out: int = 200, lora_r: int = 16, seed: int = 42) -> list[Checkpoint]:
    import torch

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    torch.manual_seed(seed)
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    held, train = pairs[:held_out], pairs[held_out:]
    if len(train) < steps * batch_size:
        raise ValueError(f"{steps} steps of {batch_size} need {steps * batch_size} training pairs; "
                         f"there are {len(train)} after {held_out} held out")
    model, tokenizer = _load(model_path, full=False, lora_r=lora_r, dropout=0.05)
    letter_id = dict(zip(mcq.LETTERS, mcq.letter_token_ids(tokenizer, len(mcq.LETTERS)), strict=True))

    def encode(row: dict[str, Any]) -> list[int]:
        text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)

    def letter_logps(rows: list[dict[str, Any]], reference: bool = False) -> tuple[Any, Any]:
        inputs, mask, positions = (t.to(model.device) for t in left_padded([encode(row) for row in rows], tokenizer))
        with torch.autocast(model.device.type, dtype=torch.bfloat16):
            if reference:
                with model.disable_adapter():
                    logits = model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                                   logits_to_keep=1).logits[:, -1]
            else:
                logits = model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                               logits_to_keep=1).logits[:, -1]
        logps = torch.log_softmax(logits.float(), dim=-1)
        rows_index = torch.arange(len(rows))
        chosen = logps[rows_index, [letter_id[r["chosen"][-1]["content"]] for r in rows]]
        rejected = logps[rows_index, [letter_id[r["rejected"][-1]["content"]] for r in rows]]
        return chosen, rejected

    def checkpoint(step: int, train_loss: float | None) -> Checkpoint:
        accuracy, predicted = _score(model, tokenizer, eval_items, f"step {step}")
        model.eval()
        with torch.no_grad():
            above = sum(int((c > r).sum()) for s in range(0, len(held), 16)
                        for c, r in [letter_logps(held[s: s + 16])])
        model.train()
        return Checkpoint(step, accuracy, above / max(len(held), 1), predicted, train_loss)

    def batch_loss(step: int) -> Any:
        batch = train[(step - 1) * batch_size: step * batch_size]
        chosen, rejected = letter_logps(batch)
        with torch.no_grad():
            ref_chosen, ref_rejected = letter_logps(batch, reference=True) if objective == "dpo" else (chosen, rejected)
        return pair_loss(objective, chosen, rejected, ref_chosen, ref_rejected, beta)

    # AdamW's default weight decay (0.01), as the probe had before the key probe shared this loop.
    return _train(model, batch_loss, checkpoint, lr=lr, steps=steps, eval_every=eval_every, warmup=min(10, steps),
                  weight_decay=0.01, desc=f"{objective} probe")


def main(
    data: Annotated[Path | None, typer.Option(help="preference pairs from `zephyr data science` (JSON Lines)",
                                              exists=True, dir_okay=False)] = None,
    splits: Annotated[str | None, typer.Option(
        help="instead of --data: SFT on the key over these MCQ training splits (NAME:SPLIT,...), options "
             "permuted at every draw")] = None,
    model: Annotated[str, typer.Option(help="registry model")] = "smollm2-135m-instruct",
    objective: Annotated[str | None, typer.Option(
        help="--data: dpo (sigmoid loss against the frozen model, the default) or sft (NLL of the key); "
             "--splits trains with sft only")] = None,
    lr: float = 1e-4, beta: float = 0.1,
    steps: Annotated[int, typer.Option(min=1)] = 120,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    eval_every: Annotated[int, typer.Option(min=1)] = 60,
    full: Annotated[bool, typer.Option(help="--splits: train every weight instead of a LoRA adapter")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank")] = 16,
    held_out: Annotated[int, typer.Option(help="pairs or questions kept out of training and scored")] = 200,
    benchmark: Annotated[str, typer.Option(help="benchmark scored at each checkpoint")] = "arc_easy",
    eval_split: Annotated[str, typer.Option(help="its split: validation to choose by; test only to report once")]
    = "validation",
    eval_limit: Annotated[int, typer.Option(help="its first N questions")] = 500,
) -> None:
    if (data is None) == (splits is None):
        raise typer.BadParameter("give exactly one of --data (pairs) or --splits (MCQ training splits)",
                                 param_hint="--data / --splits")
    if objective is not None and objective not in OBJECTIVES:
        raise typer.BadParameter(f"choose one of {', '.join(OBJECTIVES)}", param_hint="--objective")
    if splits is not None and objective not in (None, "sft"):
        raise typer.BadParameter("--splits trains on the key's letter (sft); DPO needs --data pairs",
                                 param_hint="--objective")
    objective = objective or ("sft" if splits is not None else "dpo")
    if full and data is not None:
        raise typer.BadParameter("--full applies to --splits; the pair probe's DPO reference is the LoRA-disabled "
                                 "model", param_hint="--full")
    split_list = [part.strip() for part in splits.split(",") if part.strip()] if splits is not None else []
    if splits is not None:
        try:  # a bad list is refused before the model or any data is read
            check_mcq_sources(split_list)
        except SourceError as exc:
            raise typer.BadParameter(str(exc), param_hint="--splits") from exc
    settings = Settings()
    try:
        path = Registry(settings.models_dir).get(model).path
    except RegistryError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from exc
    try:
        items = benchmarks.load(benchmark, split=eval_split, data_dir=settings.data_dir, limit=eval_limit)
    except benchmarks.DatasetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--benchmark") from exc
    started = time.perf_counter()
    if splits is not None:
        try:
            train_items = mcq_training_items(split_list, settings.data_dir)
        except (SourceError, benchmarks.DatasetError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--splits") from exc
        # A source may be the split scored (`sciq:validation` with the default --eval-split): never score a question
        # the probe trains on.
        scored = benchmarks.without_questions_of(items, train_items)
        if not scored:
            raise typer.BadParameter(f"every scored {benchmark} {eval_split} question is among the training ones; "
                                     "score another --eval-split or train on other --splits", param_hint="--splits")
        if len(scored) < len(items):
            make_console(stderr=True).print(f"left out {len(items) - len(scored)} scored question(s) the probe "
                                            "trains on")
        items = scored
        results = key_probe(path, train_items, items, lr=lr, steps=steps, batch_size=batch_size,
                            eval_every=eval_every, held_out=held_out, full=full, lora_r=lora_r)
        title = (f"key probe on {model} ({'full fine-tuning' if full else f'LoRA r{lora_r}'}, {len(train_items)} "
                 f"questions, options permuted): lr {lr}, batch {batch_size}")
        held_column = "held-out accuracy"
    else:
        assert data is not None
        try:
            pairs = direct_pairs(data)
        except ValueError as exc:  # JSONDecodeError is a ValueError
            raise typer.BadParameter(f"{data}: {exc}", param_hint="--data") from exc
        results = probe(path, pairs, items, objective=objective, lr=lr, beta=beta, steps=steps,
                        batch_size=batch_size, eval_every=eval_every, held_out=held_out, lora_r=lora_r)
        title = f"{objective} probe on {model}: lr {lr}, beta {beta}, batch {batch_size}"
        held_column = "held-out chosen > rejected"
    table = Table(title=f"{title} ({time.perf_counter() - started:.0f} s)")
    for column in ("step", "mean train loss", f"{benchmark} letter acc (n={len(items)})", held_column,
                   "predicted letters"):
        table.add_column(column)
    for c in results:
        table.add_row(str(c.step), "" if c.train_loss is None else f"{c.train_loss:.3f}", f"{c.accuracy:.3f}",
                      f"{c.held_out_accuracy:.3f}", " ".join(f"{k}:{v}" for k, v in c.predicted.items()))
    make_console().print(table)


if __name__ == "__main__":
    typer.run(main)
