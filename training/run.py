"""Run a recipe: load its data and base model, train with TRL (+ PEFT), and add the result to the registry.

Every run lives in `$ZEPHYR_HOME/runs/<output>/`: the resolved recipe, `metrics.jsonl` (every logged step),
`train.log`, `checkpoints/` (resumed from when the same recipe runs again), `summary.json` and plots. The
registry entry is a plain Hugging Face folder (LoRA merged) with a manifest naming parent, method and the
recipe and data digests."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console

from offline.benchmarks import normalize_words
from training.plots import json_line
from training.recipes import DataSpec, Recipe, RecipeError, config_class
from zephyr.console import make_console
from zephyr.paths import write_text_atomic
from zephyr.registry import (
    ModelManifest,
    Registry,
    RegistryEntry,
    RegistryError,
    check_name,
    digest_file,
    not_a_full_precision_chat_model,
)
from zephyr.schemas import (
    DataFileError,
    KTOExample,
    PreferencePair,
    SFTExample,
    TextPreferencePair,
    TextSFTExample,
    VerifiablePrompt,
    read_jsonl,
)
from zephyr.settings import Settings

SCHEMAS: dict[str, type[BaseModel]] = {"sft": SFTExample, "rs": SFTExample, "dpo": PreferencePair,
                                       "kto": KTOExample, "rm": PreferencePair, "grpo": VerifiablePrompt}
# TRL reads these columns; provenance (`meta`, `source`) stays in the files, not in the trainer.
COLUMNS = {"sft": ["messages"], "rs": ["messages"], "dpo": ["prompt", "chosen", "rejected"],
           "kto": ["prompt", "completion", "label"], "rm": ["prompt", "chosen", "rejected"],
           "grpo": ["prompt", "answer", "letters"]}  # answer and letters reach the reward functions
# Plain-text records (no chat template): tokenized here by training/data/cloze.py with mcq.cloze_split (the split
# /mcq's cloze scores: no special tokens, no EOS) and handed to TRL as id columns, not to TRL's own tokenization.
TEXT_SCHEMAS: dict[str, type[BaseModel]] = {"dpo": TextPreferencePair, "sft": TextSFTExample}
TEXT_COLUMNS = {"dpo": ["prompt", "chosen", "rejected"], "sft": ["prompt", "completion"]}
RECIPE_FILE = "recipe.json"
QUESTION_COLUMN = "_question_id"  # the question a record was built from: eval_group question's key, never trained on


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says what to do."""


@dataclass
class RunResult:
    entry: RegistryEntry | None  # None on the non-main processes of a multi-GPU run
    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def is_plain_text(file: Path) -> bool:
    """Whether a data file holds plain-text records (the first record's `prompt` is a string). A file that is not
    UTF-8 reads as not plain: read_jsonl then names its line."""
    with Path(file).open("rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    return isinstance(json.loads(raw.decode("utf-8")).get("prompt"), str)
                except (ValueError, AttributeError):  # UnicodeDecodeError is a ValueError
                    return False
    return False


def read_records(files: list[Path], method: str, limit: int | None = None,
                 question_ids: bool = False) -> list[dict[str, Any]]:
    """The method's columns of every record; a record in another schema fails naming its file and line. dpo and sft
    also read the plain-text schemas (TextPreferencePair, TextSFTExample), one kind for all files. With
    `question_ids`, each row also carries its `meta.question_id` as QUESTION_COLUMN (for hold_out; dropped before
    training)."""
    plain = [is_plain_text(file) for file in files] if method in TEXT_SCHEMAS else [False] * len(files)
    if len(set(plain)) > 1:
        raise RecipeError(f"{', '.join(map(str, files))} mix plain-text and conversational records; use one kind")
    text = bool(plain and plain[0])
    schema, columns = (TEXT_SCHEMAS[method], TEXT_COLUMNS[method]) if text else (SCHEMAS[method], COLUMNS[method])
    rows: list[dict[str, Any]] = []
    for file in files:
        try:
            for number, record in enumerate(read_jsonl(file, schema), start=1):
                row = {k: v for k, v in record.model_dump(mode="json").items() if k in columns}
                if method in ("rs", "sft") and "messages" in row:
                    row = _as_completion(row["messages"], method, file, number)
                if question_ids:
                    question = (getattr(record, "meta", None) or {}).get("question_id")
                    if not isinstance(question, str):
                        raise RecipeError(f"{file} record {number} has no meta.question_id, which data.eval_group: "
                                          "question holds out by (`zephyr data science`, `cloze` and `restate` write "
                                          "it); use eval_group: record or opening for these records")
                    row[QUESTION_COLUMN] = question
                rows.append(row)
                if limit and len(rows) >= limit:
                    return rows
        except DataFileError as exc:
            raise RecipeError(f"{exc} ({method} needs {schema.__name__} records: {', '.join(columns)})") from None
    if not rows:
        raise RecipeError(f"{', '.join(map(str, files))} hold no records")
    return rows


def records_sharing_a_question(files: list[Path], limit: int | None = None) -> int:
    """How many of the files' records (the first `limit`) repeat an earlier record's `meta.question_id` or opening
    (its first non-system message, or plain-text prompt, word for word: one stem under two question ids, or a cloze
    context): held out by record, such a question has records on both sides of the split."""
    seen: set[str] = set()
    openings: set[str] = set()
    shared = read = 0
    for file in files:
        with Path(file).open("rb") as handle:
            for raw in handle:
                if not raw.strip():
                    continue
                if limit and read >= limit:
                    return shared
                read += 1
                record = json.loads(raw)  # read_records has checked every line already
                meta = record.get("meta") or {}
                question = meta.get("question_id") if isinstance(meta.get("question_id"), str) else None
                words = opening_words(opening(record))
                shared += (question is not None and question in seen) or (bool(words) and words in openings)
                if question is not None:
                    seen.add(question)
                openings.add(words)
    return shared


def checked_cleaning(train_files: list[Path], spec: DataSpec, console: Console,
                     eval_files: list[Path] | None = None) -> dict[str, int]:
    """How many records the run trains on (the training files' first `data.limit`, and every held-out file's) were
    cleaned (partly: without PII redaction or decontamination), written with --no-clean and never cleaned since (or a
    raw review export's), or carry no stamp (hand-made, or written before records were stamped), as `cleaning_of`
    reads them. Never-cleaned records are refused unless `data.allow_uncleaned`: they may hold a student's name or a
    test question."""
    from training.data.clean import cleaning_of

    counts = dict.fromkeys(("cleaned", "cleaned_partly", "never_cleaned", "unstamped"), 0)
    never: list[str] = []
    left = spec.limit  # read_records stops the training files there: records past it never train
    for file, limited in [*((f, True) for f in train_files), *((f, False) for f in eval_files or [])]:
        before = counts["never_cleaned"]
        with Path(file).open("rb") as handle:
            for raw in handle:
                if not raw.strip():  # read_records has checked every line already
                    continue
                if limited and left is not None:
                    if left <= 0:
                        break
                    left -= 1
                counts[cleaning_of(json.loads(raw).get("meta"))] += 1
        if counts["never_cleaned"] > before:
            never.append(f"{file} ({counts['never_cleaned'] - before})")
    if never and not spec.allow_uncleaned:
        raise RecipeError(f"records written with --no-clean, or a review export's, were never cleaned: "
                          f"{', '.join(never)}. Run `zephyr data clean --input FILE --out CLEANED --format ...` (a "
                          "review export: `zephyr data review`) on each and train on what it writes, or set "
                          "data.allow_uncleaned: true to train on them as they are")
    if counts["never_cleaned"]:
        console.print(f"[yellow]{counts['never_cleaned']} records were never cleaned (data.allow_uncleaned)[/]")
    if counts["cleaned_partly"]:
        console.print(f"[yellow]{counts['cleaned_partly']} records were cleaned without PII redaction or without "
                      "benchmark decontamination (--no-pii, --no-decontaminate)[/]")
    if counts["unstamped"]:
        console.print(f"[yellow]{counts['unstamped']} records carry no cleaning stamp (meta.cleaned: hand-made, or "
                      "written before records were stamped): `zephyr data clean` them to be sure they hold no "
                      "student's PII or test question[/]")
    return counts


def _as_completion(messages: list[dict[str, Any]], method: str, file: Path, number: int) -> dict[str, Any]:
    """A conversation as TRL's conversational prompt and completion, so SFT learns its last answer only (TRL turns
    completion_only_loss on for such rows): the one a reviewer approved or the reward model ranked first, not the
    student's turns, the system prompt, nor earlier assistant turns nobody judged."""
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise RecipeError(f"{file} record {number}: an {method} record ends with the assistant answer it teaches")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def with_room(part: Any, tokenizer: Any, max_length: int | None) -> tuple[Any, int]:
    """The chat prompt/completion rows (sft, rs) whose prompt leaves room for the answer within `max_length`, and how
    many did not: TRL truncates those to examples with no answer token left to learn and drops them without a word."""
    if part is None or not max_length or "completion" not in part.column_names or isinstance(part[0]["prompt"], str):
        return part, 0
    from zephyr.prompts import encode_chat

    kept = part.filter(lambda row: len(encode_chat(tokenizer, row["prompt"])) < max_length)
    return kept, len(part) - len(kept)


def opening(record: dict[str, Any]) -> str:
    """The first non-system message of a record's prompt (or conversation), or its plain-text prompt."""
    prompt = record.get("prompt", record.get("messages"))
    if isinstance(prompt, list):
        return next((m["content"] for m in prompt if m.get("role") != "system"), json.dumps(prompt))
    return str(prompt)


def opening_words(text: str) -> str:
    """An opening's words, case, spacing and punctuation aside: what joins records into one held-out group."""
    return " ".join(normalize_words(text))


def hold_out(dataset: Any, fraction: float, group: str, seed: int) -> tuple[Any, Any]:
    """Split off `fraction` of the records for evaluation by a fixed seed. With `group="opening"` whole groups of
    records sharing an opening message go to one side, so the held-out agreement is not measured on the second
    half of a conversation whose first half was trained on; with `group="question"`, whole groups of records built
    from one benchmark question (QUESTION_COLUMN: a science question's explained and direct records differ in
    every message)."""
    if group == "record":
        if len(dataset) - math.ceil(fraction * len(dataset)) < 1:  # datasets raises on an empty side: the caller
            return dataset.select([]), dataset  # names the part that came out empty, and the recipe's keys
        split = dataset.train_test_split(test_size=fraction, seed=seed)
        return split["train"], split["test"]
    openings = [opening(record) for record in dataset]
    keys_of = dataset[QUESTION_COLUMN] if group == "question" else openings
    # Records join a group by their key, and also by their opening's words (case, spacing and punctuation aside):
    # one question under two benchmark ids, or a chat asked again in other case, is never on both sides.
    words_of = [opening_words(text) for text in openings]
    parent = list(range(len(dataset)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    first: dict[tuple[str, str], int] = {}
    for index, (key, words) in enumerate(zip(keys_of, words_of, strict=True)):
        for tag in (("key", key), ("words", words)) if words else (("key", key),):
            parent[root(index)] = root(first.setdefault(tag, index))
    members: dict[int, list[int]] = {}
    for index in range(len(dataset)):
        members.setdefault(root(index), []).append(index)
    # Each group drawn by its smallest key, as groups of one key each were before: without merges the split is the
    # one earlier runs drew.
    groups = {min(keys_of[i] for i in indices): indices for indices in members.values()}
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    held: list[int] = []
    for key in keys:
        if len(held) >= fraction * len(dataset):
            break
        held += groups[key]
    kept = sorted(set(range(len(dataset))) - set(held))
    return dataset.select(kept), dataset.select(sorted(held))


def balance_lengths(dataset: Any, seed: int) -> Any:
    """Keep as many pairs whose chosen reply is the longer as pairs whose chosen reply is the shorter, dropping a
    seeded random part of the larger side (pairs of equal length stay): on hh-rlhf the chosen reply is the longer
    58% of the time, and a small reward model learns that before anything else."""
    from offline.reward import reply_lengths

    longer, shorter, even = [], [], []
    for index, pair in enumerate(dataset):
        chosen, rejected = reply_lengths(pair)
        (longer if chosen > rejected else shorter if chosen < rejected else even).append(index)
    if not longer and not shorter:  # every pair's replies are of one length (direct letters): nothing to balance
        return dataset
    keep = min(len(longer), len(shorter))
    if not keep:
        side = "longer" if longer else "shorter"
        raise RecipeError(f"data.balance_lengths: in every training pair with replies of unequal length the chosen "
                          f"reply is the {side}, so balancing leaves none of them; drop balance_lengths or add pairs")
    rng = random.Random(seed)
    kept = rng.sample(longer, keep) + rng.sample(shorter, keep) + even
    return dataset.select(sorted(kept))


def check_output_free(registry: Registry, output: str, overwrite: bool, base: str) -> None:
    """Before hours of training, not after: the name is free (or may be replaced) and is not the base's own."""
    if output == base and overwrite:  # without --overwrite check_free refuses it as existing
        raise RegistryError(f"output {output!r} is the model being trained; set output=NAME to another name")
    registry.check_free(output, overwrite)


def data_digest(files: list[Path]) -> str:
    combined = hashlib.sha256()
    for file in files:
        combined.update(digest_file(file).encode())
    return combined.hexdigest()


def weights_digest(model_dir: Path) -> str:
    """The digest of a checkpoint's weight files (in name order): the same weights on any machine."""
    return data_digest(sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin")))


def device_summary() -> tuple[bool, str]:
    import torch

    if torch.cuda.is_available():
        return True, f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return False, "CPU"


def build_args(recipe: Recipe, run_dir: Path, has_eval: bool, plain_text: bool = False,
               reward_weights: list[float] | None = None) -> Any:
    cuda, _ = device_summary()
    defaults: dict[str, Any] = {"logging_steps": 1, "save_strategy": "steps", "save_steps": 50, "save_total_limit": 2,
                                "report_to": "none", "seed": 42, "disable_tqdm": False}
    if has_eval:
        defaults |= {"eval_strategy": "steps", "eval_steps": 50}
    if plain_text and recipe.method == "sft":
        # Pre-tokenized rows carry no `prompt` column, so TRL would otherwise train on the context too.
        defaults["completion_only_loss"] = True
    options = defaults | recipe.trainer
    if recipe.method in ("dpo", "kto", "rm") and recipe.lora is not None and recipe.lora.dropout > 0 \
            and options.get("disable_dropout", True):
        # TRL's disable_dropout (on by default for these) zeroes every dropout after wrapping the model, LoRA's too
        logging.getLogger("zephyr.train").warning(
            "lora.dropout %s has no effect: TRL's %s turns every dropout off (disable_dropout); set "
            "trainer.disable_dropout: false to keep it", recipe.lora.dropout, recipe.method.upper())
    if reward_weights is not None:
        options["reward_weights"] = reward_weights
    try:
        return config_class(recipe.method)(output_dir=str(run_dir / "checkpoints"), use_cpu=not cuda, **options)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"trainer: {exc}") from None


def _peft_config(recipe: Recipe, model: Any) -> Any:
    if recipe.lora is None:
        return None
    from peft import LoraConfig

    layers, targets = None, recipe.lora.target_modules
    if isinstance(targets, list):  # PEFT names a module it cannot find only deep inside the trainer's constructor
        names = [name for name, _ in model.named_modules()]
        # PEFT matches a target by the end of a module's name: "q_proj" and "self_attn.q_proj" alike
        if missing := [target for target in targets
                       if not any(name == target or name.endswith(f".{target}") for name in names)]:
            raise RecipeError(f"lora.target_modules: {recipe.model} has no module named {missing[0]!r}; its linear "
                              f"layers are {', '.join(_layer_linears(model))} (or use all-linear)")
    if recipe.lora.top_layers:
        count = model.config.num_hidden_layers
        if recipe.lora.top_layers > count:
            raise RecipeError(f"lora.top_layers is {recipe.lora.top_layers} but {recipe.model} has {count} layers")
        layers = list(range(count - recipe.lora.top_layers, count))
        if targets == "all-linear":  # PEFT takes a layer range only with module names: every linear of a layer
            targets = _layer_linears(model)
    return LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                      target_modules=targets, layers_to_transform=layers,
                      task_type="SEQ_CLS" if recipe.method == "rm" else "CAUSAL_LM")


def _layer_linears(model: Any) -> list[str]:
    """The names of the linear modules in the model's layers (q_proj, ..., down_proj)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and ".layers." in name})


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(recipe: Recipe, path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cuda, _ = device_summary()
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if recipe.qlora:
        if not cuda:
            raise TrainingError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit training); on CPU drop `qlora: true` "
                                "to train a LoRA adapter on the full-precision base")
        from transformers import BitsAndBytesConfig

        kwargs = {"dtype": torch.bfloat16, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)}
    tokenizer = _load_tokenizer(path)
    if recipe.method == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if recipe.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model, tokenizer


def _trainer(recipe: Recipe, model: Any, tokenizer: Any, args: Any, train: Any, evaluation: Any,
             callbacks: list[Any], reward_funcs: list[Any] | None = None) -> Any:
    import trl

    common = {"args": args, "train_dataset": train, "eval_dataset": evaluation, "processing_class": tokenizer,
              "peft_config": _peft_config(recipe, model), "callbacks": callbacks}
    if recipe.method in ("sft", "rs"):
        return trl.SFTTrainer(model=model, **common)
    if recipe.method == "dpo":
        return _dpo_trainer_class()(model=model, **common)
    if recipe.method == "kto":
        return trl.KTOTrainer(model=model, **common)
    if recipe.method == "grpo":
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_funcs or [], **common)
        for func in reward_funcs or []:
            if hasattr(func, "bind"):  # rewards read by the policy itself, as it is being trained
                func.bind(trainer.model, tokenizer)
        return trainer
    return _reward_trainer_class()(model=model, **common)


def grpo_rewards(recipe: Recipe, registry: Registry) -> tuple[list[Any], list[float]]:
    """GRPO's reward functions (training/rewards.py by name; a reward model as its registry folder, which TRL loads
    as a sequence classifier) and their weights, in the recipe's order."""
    from training.rewards import REWARDS

    funcs, weights = [], []
    for name, weight in recipe.rewards.weighted():
        if name in REWARDS:
            reward = REWARDS[name]
            funcs.append(reward() if isinstance(reward, type) else reward)  # a class holds state (ServedLetter)
        else:
            entry = registry.get(name)
            if entry.manifest.method != "rm":
                raise TrainingError(f"rewards.reward_model {name!r} is a {entry.manifest.method} model, not a reward "
                                    "model; train one with `zephyr train rm`")
            funcs.append(str(entry.path))
        weights.append(weight)
    return funcs, weights


def _reward_trainer_class() -> type:
    """TRL's RewardTrainer whose tokenized pairs carry a `length` column (the longer side), so that
    `train_sampling_strategy: group_by_length` can batch pairs of similar length. hh-rlhf transcripts run from 30 to
    500 tokens: random batches of 8 pairs are half padding (measured 50% on rm-hh's data), sorted ones 9%."""
    import trl

    class LengthAwareRewardTrainer(trl.RewardTrainer):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            return dataset.map(lambda pair: {"length": max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))})

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "length"]

    return LengthAwareRewardTrainer


def _dpo_trainer_class() -> type:
    """TRL's DPOTrainer, taking a dataset that already holds `prompt_ids`/`chosen_ids`/`rejected_ids` as it is.

    TRL 1.16 always tokenizes DPO data itself: it appends the EOS text to every plain-text reply and tokenizes with
    the tokenizer's special tokens, so its ids for a cloze pair would hold a term /mcq's cloze score does not (the
    EOS after the option). Its collator takes the id columns as they are; only the tokenization is skipped here,
    keeping TRL's own filter of prompts that fill `max_length`."""
    import trl

    class TokenizedDPOTrainer(trl.DPOTrainer):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if "prompt_ids" not in (dataset.column_names or []):
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if args.max_length is not None and args.truncation_mode == "keep_start":
                dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length)
            return dataset

    return TokenizedDPOTrainer


def pretokenize(dataset: Any, tokenizer: Any, method: str, console: Console, name: str,
                end_with_eos: bool = False) -> Any:
    """Plain-text rows as the trainer's id columns (training/data/cloze.py), dropping rows that cannot be split."""
    from datasets import Dataset

    from training.data.cloze import tokenize_rows

    rows, dropped = tokenize_rows(list(dataset), tokenizer, method, end_with_eos)
    if dropped:
        console.print(f"[yellow]{dropped} {name} records dropped: their replies do not share the prompt's tokens[/]")
    if not rows:
        raise TrainingError(f"no {name} record could be tokenized")
    return Dataset.from_list(rows)


def _metrics_callback(path: Path) -> Any:
    from transformers import TrainerCallback

    class MetricsLog(TrainerCallback):
        """Every logged step as one JSON line, appended, so a resumed run continues the same file."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            # A resumed run starts again at its checkpoint's step: rows logged after it (up to the stop) are logged
            # again, so they go, or the file would hold two values for those steps and the curves double back.
            if state.is_world_process_zero and path.is_file():
                rows = path.read_text(encoding="utf-8").splitlines(keepends=True)
                # a line cut off by the stop (a kill, a full disk) goes too, rather than failing every resume
                kept = [row for row in rows if (logged := json_line(row)) is not None
                        and logged.get("step", 0) <= state.global_step]
                if len(kept) != len(rows):
                    path.write_text("".join(kept), encoding="utf-8")

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            if logs and state.is_world_process_zero:
                with path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    return MetricsLog()


def final_eval(trainer: Any) -> dict[str, Any]:
    """Held-out metrics at the last step. transformers already evaluates there under a step-based eval strategy
    (a second pass cost 1.5 min of a 60-minute CPU run): reuse that log entry, evaluate only when there is none."""
    step = trainer.state.global_step
    logged = [row for row in trainer.state.log_history if row.get("step") == step and "eval_loss" in row]
    if logged:
        return {k: v for k, v in logged[-1].items() if k.startswith("eval_")}
    return trainer.evaluate()


def heldout_eval(trainer: Any, dataset: Any, metrics_log: Any) -> dict[str, Any]:
    """The trainer's loss and metrics on the held-out part, as `heldout_*`. TRL's trainers log their own metrics
    (rewards, token accuracy) as `eval_*` whatever the prefix, so the row would read as validation's: it stays out
    of metrics.jsonl (whose eval rows are what a sweep chooses by) and its keys are renamed here."""
    trainer.pop_callback(metrics_log)
    try:
        scored = trainer.evaluate(eval_dataset=dataset, metric_key_prefix="heldout")
    finally:
        trainer.add_callback(metrics_log)
    return {f"heldout_{key.removeprefix('eval_')}" if key.startswith("eval_") else key: value
            for key, value in scored.items()}


def pair_agreement_metrics(registry: Registry, entry: RegistryEntry, pairs: Any, part: str, console: Console,
                           run_dir: Path) -> dict[str, Any]:
    """The registered reward model's agreement with every pair of one part (`heldout` or `validation`), pooled
    (TRL's `eval_accuracy` averages per batch and leaves out pairs over max_length), recorded in its manifest as
    `<part>_agreement` for `zephyr eval report`. Each pair's outcome goes to `<part>-agreement.jsonl` in the run
    folder: runs split by the same seed hold the same pairs in the same order, so two sweep variants compare paired."""
    from offline.reward import RewardModel, pair_agreement, reply_lengths

    console.print(f"scoring the {len(pairs)} {part} pairs with the registered reward model ...")
    pairs = list(pairs)
    result = pair_agreement(RewardModel.load(entry.path), pairs)
    with (run_dir / f"{part}-agreement.jsonl").open("w") as out:
        for pair, agrees in zip(pairs, result.pop("per_pair"), strict=True):
            chosen, rejected = reply_lengths(pair)
            pair_id = hashlib.sha256(json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]]).encode())
            out.write(json.dumps({"pair": pair_id.hexdigest()[:16], "agrees": bool(agrees),
                                  "chosen_chars": chosen, "rejected_chars": rejected}) + "\n")
    registry.record_eval(entry.name, f"{part}_agreement", result, made_at=entry.manifest.created_at)
    # kept in the run folder too: `train register` records it where the folder is copied (a GPU box's run)
    write_text_atomic(run_dir / f"{part}-agreement.json", json.dumps(result))
    low, high = result["ci95"]
    return {f"{part}_pairs": result["n"], f"{part}_agreement": result["agreement"],
            f"{part}_agreement_low": low, f"{part}_agreement_high": high,
            f"{part}_longer_answer": result["longer_answer"],
            f"{part}_agreement_shorter_chosen": result["shorter_chosen"]["agreement"]}


def holds_training(run_dir: Path) -> bool:
    """Whether a run folder holds a checkpoint or a trained model: work a rerun resumes from or must not lose."""
    return last_checkpoint(run_dir) is not None or any((run_dir / done).is_dir() for done in ("adapter", "trained"))


TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME, the last file a checkpoint's save writes


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest whole checkpoint: transformers writes `trainer_state.json` last, so a folder without it was
    cut off while saving (a kill, a full disk) and holds no state to resume (transformers' own `get_last_checkpoint`
    takes it: the run started again at step 0 on the weights it held, or failed on every rerun)."""
    whole = [path for path in _checkpoints(run_dir) if _whole(path)]
    return whole[-1] if whole else None


def cut_off_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders a save left part-written (no `trainer_state.json`, or one cut off while it was written:
    transformers writes it in place): nothing resumes from them."""
    return [path for path in _checkpoints(run_dir) if not _whole(path)]


def _whole(checkpoint: Path) -> bool:
    try:
        run_file(checkpoint / TRAINER_STATE)
    except TrainingError:
        return False
    return True


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders by step (transformers names them checkpoint-STEP)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = run_dir / "checkpoints"
    found = {}
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else ():
        if (step := path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")).isdigit() and path.is_dir():
            found[int(step)] = path
    return [found[step] for step in sorted(found)]


def saved_recipe_digest(run_dir: Path) -> str | None:
    """The digest of the recipe the run folder was started with; None for a folder no run has started."""
    saved = run_dir / RECIPE_FILE
    return run_file(saved).get("digest") if saved.is_file() else None


def run_file(path: Path) -> dict[str, Any]:
    """One of a run folder's JSON files (recipe.json, summary.json, a part's agreement), or a TrainingError naming it
    where a kill or a full disk cut it off or another tool wrote something else there."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TrainingError(f"cannot read {path} ({type(exc).__name__}: {exc}): restore it from the run's copy, or "
                            "pass --fresh to start the run over") from None
    if not isinstance(found, dict):
        raise TrainingError(f"{path} holds no JSON object: restore it, or pass --fresh to start the run over")
    return found


def prepare_run_dir(recipe: Recipe, run_dir: Path, fresh: bool, data: str | None = None,
                    base_made_at: str | None = None, base_weights: str | None = None) -> bool:
    """Create or reuse the run folder; True when training resumes from a checkpoint of the same recipe on the same
    data (`data`: the digest of the data files' contents; the recipe names them only by path) from the same base
    entry (`base_made_at`: when the base model's entry was made; the recipe names it only by name)."""
    saved = run_dir / RECIPE_FILE
    main = int(os.environ.get("RANK", "0")) == 0  # under `accelerate launch` only the first process writes
    if fresh and run_dir.exists() and main:
        shutil.rmtree(run_dir)
    for cut_off in cut_off_checkpoints(run_dir) if main else ():
        # Not resumed from, and left in place a later save of that step would mix its files with the stale ones.
        logging.getLogger("zephyr.train").warning("removing %s: a save cut off before it wrote %s", cut_off,
                                                  TRAINER_STATE)
        shutil.rmtree(cut_off, ignore_errors=True)
    _wait_for_every_process()  # no process may read the folder the first one is still deleting
    # A folder with neither a checkpoint nor a trained model holds nothing to resume or lose: an attempt refused
    # after the folder was made (a recipe value only the model can check) starts again under the corrected recipe.
    if saved.is_file() and holds_training(run_dir):
        started = run_file(saved)
        if started.get("digest") != recipe.digest():
            raise TrainingError(f"{run_dir} holds a run of a different recipe; pass --fresh to start over, or set "
                                f"another `output` name")
        started_on = started.get("data_digest")  # absent in folders of older versions
        if data is not None and started_on is not None and started_on != data:
            raise TrainingError(f"{run_dir} holds a run started on other data: the recipe's data files have changed "
                                "since (regenerated, or read from another folder); pass --fresh to start over on "
                                "these, or set another `output` name")
        started_from = started.get("base_made_at")  # absent in folders of older versions
        if base_made_at is not None and started_from is not None and started_from != base_made_at:
            raise TrainingError(f"{run_dir} holds a run started from an earlier {recipe.model!r}, since replaced "
                                "under that name: its checkpoints adapt weights the base no longer has; pass --fresh "
                                "to start over, or set another `output` name")
        return last_checkpoint(run_dir) is not None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only runs/ folder: one line, before the model loads
        raise TrainingError(f"cannot make the run folder {run_dir}: {exc.strerror or exc}") from None
    if main:
        # base_weights: what `zephyr train register` checks on another machine, where base_made_at differs.
        write_text_atomic(saved, json.dumps({"digest": recipe.digest(), "data_digest": data,
                                             "base_made_at": base_made_at, "base_weights": base_weights,
                                             "recipe": recipe.resolved()}, indent=2))
    return False


def _wait_for_every_process() -> None:
    """A barrier across the processes of `accelerate launch` (nothing to wait for in a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def _file_logger(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("transformers", "trl", "peft", "training"):
        logging.getLogger(name).addHandler(handler)
    return handler


def trainable_base(registry: Registry, name: str) -> RegistryEntry:
    """The registry entry a recipe's `model` names, refused (before any work) if it is quantized or no chat model:
    training a reward model's backbone as a chat model would drop its score head without a word, and a quantized
    entry has no full-precision weights to merge an adapter into."""
    base = registry.get(name)
    if why := not_a_full_precision_chat_model(base):
        raise TrainingError(f"model: {why}")
    return base


def data_spec(recipe: Recipe, data_files: list[Path] | None) -> DataSpec:
    """What a run trains on: the recipe's data, or the files rejection sampling has just written (it has no data
    section: its own sampling.allow_uncleaned says whether never-cleaned prompts may become training data)."""
    return recipe.data or DataSpec(train=data_files or [],
                                   allow_uncleaned=bool(recipe.sampling and recipe.sampling.allow_uncleaned))


def train(recipe: Recipe, settings: Settings, *, recipe_path: Path | None = None, fresh: bool = False,
          overwrite: bool = False, console: Console | None = None, data_files: list[Path] | None = None) -> RunResult:
    """Train `recipe` and register the result. `data_files` replaces the recipe's training data (rejection
    sampling trains on the file it has just written)."""
    console = console or make_console()
    registry = Registry(settings.models_dir)
    base = trainable_base(registry, recipe.model)
    output = check_name(recipe.output_name(recipe_path))  # names the run folder: checked before it is touched
    check_output_free(registry, output, overwrite, recipe.model)
    spec = data_spec(recipe, data_files)
    train_files = data_files or spec.train
    by_question = spec.eval_group == "question" and bool(spec.eval_fraction or spec.validation_fraction)
    rows = read_records(train_files, recipe.method, spec.limit, question_ids=by_question)
    eval_rows = read_records(spec.eval, recipe.method) if spec.eval else []
    cleaning = checked_cleaning(train_files, spec, console, spec.eval)
    if eval_rows and isinstance(rows[0].get("prompt"), str) != isinstance(eval_rows[0].get("prompt"), str):
        # one tokenization serves every part: a chat eval file beside plain-text training failed after model load
        raise RecipeError(f"{', '.join(map(str, [*train_files, *spec.eval]))} mix plain-text and conversational "
                          "records across data.train and data.eval; use one kind")

    from datasets import Dataset

    train_set = Dataset.from_list(rows)
    eval_set = Dataset.from_list(eval_rows) if eval_rows else None
    seed = spec.split_seed
    if eval_set is None and spec.eval_fraction:
        train_set, eval_set = hold_out(train_set, spec.eval_fraction, spec.eval_group, seed)
    validation_set = None
    if spec.validation_fraction:
        train_set, validation_set = hold_out(train_set, spec.validation_fraction, spec.eval_group, seed)
    for name, part in (("training", train_set), ("held-out", eval_set), ("validation", validation_set)):
        if part is not None and len(part) == 0:  # else TRL fails deep inside, with no word of the recipe
            raise TrainingError(f"the {name} part of {len(rows)} records is empty after data.eval_fraction "
                                f"{spec.eval_fraction} and data.validation_fraction {spec.validation_fraction} by "
                                f"{spec.eval_group} (one group can take everything): use more records, smaller "
                                "fractions, or another data.eval_group")
    if spec.eval_group == "record" and (spec.eval_fraction or spec.validation_fraction) and \
            (shared := records_sharing_a_question(train_files, spec.limit)):
        console.print(f"[yellow]{shared} records repeat an earlier record's question (meta.question_id) or opening "
                      "message: held out by record, a question can sit on both sides of the split and the held-out "
                      "figures flatter the model; data.eval_group: question (or opening) keeps each on one side[/]")
    dropped_for_length = 0
    if by_question:
        train_set, eval_set, validation_set = (
            part.remove_columns(QUESTION_COLUMN) if part is not None and QUESTION_COLUMN in part.column_names
            else part for part in (train_set, eval_set, validation_set))
    if spec.balance_lengths:  # the training part only: what is measured keeps every pair
        balanced = balance_lengths(train_set, seed)
        dropped_for_length = len(train_set) - len(balanced)
        train_set = balanced
    # What the trainer evaluates on while it runs, and so what a sweep reads: validation when there is one.
    watched = validation_set if validation_set is not None else eval_set

    plain_text = "prompt" in rows[0] and isinstance(rows[0]["prompt"], str)
    if spec.end_with_eos and not plain_text:
        raise TrainingError("data.end_with_eos is for plain-text (cloze) SFT examples; chat examples already end "
                            "each turn with the chat template's end token: drop it")
    run_dir = settings.home / "runs" / output
    reward_funcs, reward_weights = grpo_rewards(recipe, registry) if recipe.method == "grpo" else (None, None)
    # TRL's config checks the trainer's values before the run folder records the recipe: a bad value (a scheduler
    # name TRL does not know) is refused, and the corrected recipe is not then refused as "a different recipe".
    args = build_args(recipe, run_dir, watched is not None, plain_text, reward_weights)
    resume = prepare_run_dir(recipe, run_dir, fresh, data_digest([*train_files, *spec.eval]),
                             base.manifest.created_at.isoformat(), weights_digest(base.path))
    _, device = device_summary()
    console.print(f"[bold]{recipe.method}[/] {base.name} -> {output}: {len(train_set)} train / "
                  f"{len(eval_set) if eval_set is not None else 0} eval records"
                  f"{f' / {len(validation_set)} validation' if validation_set is not None else ''}"
                  f"{f' ({dropped_for_length} dropped to balance reply lengths)' if spec.balance_lengths else ''}, "
                  f"{'LoRA r' + str(recipe.lora.r) if recipe.lora else 'full fine-tuning'}"
                  f"{' (QLoRA)' if recipe.qlora else ''} on {device}; run folder {run_dir}"
                  f"{' (resuming)' if resume else ''}")
    handler = _file_logger(run_dir / "train.log")
    started = time.perf_counter()
    no_room_metrics: dict[str, int] = {}
    try:
        from transformers import set_seed

        # before the model is built: a reward model's score head (and a fresh LoRA) start from the recipe's seed;
        # TRL seeds only models it builds itself
        set_seed(recipe.trainer.get("seed", 42))
        model, tokenizer = _load_model(recipe, base.path)

        def tokenized(part: Any, name: str) -> Any:  # the same tokenization for every part of a plain-text run
            return pretokenize(part, tokenizer, recipe.method, console, name, spec.end_with_eos)

        if plain_text:
            train_set = tokenized(train_set, "train")
            if watched is not None:
                watched = tokenized(watched, "eval")
        elif recipe.method in ("sft", "rs") and args.truncation_mode == "keep_start" and not args.packing \
                and args.completion_only_loss is not False:  # otherwise TRL keeps such rows and learns from them
            train_set, no_room = with_room(train_set, tokenizer, args.max_length)
            if no_room:
                console.print(f"[yellow]{no_room} training records left out: their prompt fills max_length "
                              f"{args.max_length}, with no room for the answer they teach[/]")
                no_room_metrics["train_records_without_room"] = no_room
            if len(train_set) == 0:
                raise TrainingError(f"every training record's prompt fills trainer.max_length {args.max_length}: "
                                    "raise it, or train on shorter conversations")
            # The measured parts too: TRL cuts such a record to no answer token, and it drops out of the loss
            # without a word (a batch of only such records is a NaN).
            def with_room_measured(part: Any, name: str) -> Any:
                if part is None:
                    return None
                kept, left_out = with_room(part, tokenizer, args.max_length)
                if left_out:
                    console.print(f"[yellow]{left_out} {name} records left out: their prompt fills max_length[/]")
                    no_room_metrics[f"{name}_records_without_room"] = left_out
                if len(kept) == 0:
                    raise TrainingError(f"every {name} record's prompt fills trainer.max_length {args.max_length}: "
                                        "raise it, or measure on shorter conversations")
                return kept

            validation_set, eval_set = with_room_measured(validation_set, "validation"), \
                with_room_measured(eval_set, "eval")
            watched = validation_set if validation_set is not None else eval_set
        metrics_log = _metrics_callback(run_dir / "metrics.jsonl")
        try:
            trainer = _trainer(recipe, model, tokenizer, args, train_set, watched, [metrics_log], reward_funcs)
        except RecipeError:
            raise
        except ValueError as exc:  # TRL's own checks (KTO's batch size, a sampler it refuses, a LoRA target)
            raise TrainingError(f"the trainer refused the recipe: {exc}") from None
        no_room_metrics |= dropped_by_trainer(recipe.method, trainer, train_set, watched, console,
                                              getattr(args, "max_length", None))
        checkpoint = last_checkpoint(run_dir) if resume else None
        saved_state = run_file(checkpoint / TRAINER_STATE) if checkpoint is not None else {}
        sharded = getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)
        if saved_state.get("global_step", 0) >= saved_state.get("max_steps", math.inf) > 0 and not sharded:
            # Trained to its last step (it stopped after the last checkpoint: a registry error, a full disk while
            # merging). transformers, resumed there, trains one step more (its loop checks the limit only after
            # a step): the run's weights and state are the checkpoint's, as trained. (Not under DeepSpeed or FSDP,
            # whose sharded weights only train() loads: there the extra step stands.)
            from transformers import TrainerState

            trainer._load_from_checkpoint(str(checkpoint))
            trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE))
            metrics = {}
        else:
            metrics = dict(trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None).metrics)
        if checkpoint is not None:
            metrics |= whole_run_loss(run_dir / "metrics.jsonl", saved_state)
        if watched is not None:
            metrics |= final_eval(trainer)
        if validation_set is not None and eval_set is not None and recipe.method != "rm":
            # The trainer watched validation; the held-out part is scored once, now, by the same loss and metrics
            # (a reward model's is scored below, pooled over every pair, as the report reads it).
            heldout = tokenized(eval_set, "held-out") if plain_text else eval_set
            metrics |= heldout_eval(trainer, heldout, metrics_log)
        entry = _register(recipe, trainer, tokenizer, registry, base, output, run_dir, train_files, overwrite,
                          cleaning)
        if entry is not None and recipe.method == "rm":
            for part, pairs in (("validation", validation_set), ("heldout", eval_set)):
                if pairs is not None:
                    metrics |= pair_agreement_metrics(registry, entry, pairs, part, console, run_dir)
    finally:
        for name in ("transformers", "trl", "peft", "training"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    metrics |= no_room_metrics
    if spec.balance_lengths:
        metrics["train_pairs_dropped_for_length"] = dropped_for_length
    if entry is None:  # a non-main process of `accelerate launch`: the main one registers and reports
        return RunResult(entry=entry, run_dir=run_dir, metrics=metrics)
    summary = {"output": output, "parent": base.name, "method": recipe.method, "device": device,
               "train_records": len(train_set), "eval_records": len(eval_set) if eval_set is not None else 0,
               "validation_records": len(validation_set) if validation_set is not None else 0,
               "data_cleaning": cleaning, "metrics": metrics}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    from training.plots import plot_run

    plot_run(run_dir, recipe.method, validation=validation_set is not None)
    return RunResult(entry=entry, run_dir=run_dir, metrics=metrics)


def whole_run_loss(metrics_file: Path, checkpoint_state: dict[str, Any]) -> dict[str, float]:
    """A resumed run's `train_loss` over every step of the run: transformers' covers only the steps of the call
    that resumed, and the summary would say so of the whole run. The mean of the logged losses (each a logging
    interval's), and the step it resumed from."""
    from training.plots import read_metrics, series

    _, losses = series(read_metrics(metrics_file), "loss")
    return {"resumed_from_step": checkpoint_state.get("global_step", 0)} | (
        {"train_loss": sum(losses) / len(losses)} if losses else {})


def dropped_by_trainer(method: str, trainer: Any, train_set: Any, watched: Any, console: Any,
                       max_length: int | None) -> dict[str, int]:
    """Records TRL itself left out at max_length, counted (the summary's figures are of what trained): DPO and KTO
    drop a record whose prompt fills it, a reward model a pair with either side over it. A part emptied so is a
    TrainingError, not torch's "num_samples=0" traceback at the first step."""
    if method not in ("dpo", "kto", "rm"):  # SFT's and RS's are left out before (with_room); GRPO keeps prompts
        return {}
    counts = {}
    for name, given, kept in (("train", train_set, trainer.train_dataset), ("eval", watched, trainer.eval_dataset)):
        if given is None or kept is None or not hasattr(kept, "__len__") or len(kept) >= len(given):
            continue
        counts[f"{name}_records_dropped_at_max_length"] = len(given) - len(kept)
        if len(kept) == 0:
            raise TrainingError(f"every {name} record is longer than trainer.max_length {max_length} (TRL drops "
                                "them): raise it, or train on shorter conversations")
        console.print(f"[yellow]{len(given) - len(kept)} of {len(given)} {name} records left out by the trainer: "
                      f"longer than trainer.max_length {max_length}[/]")
    return counts


def _register(recipe: Recipe, trainer: Any, tokenizer: Any, registry: Registry, base: RegistryEntry, output: str,
              run_dir: Path, train_files: list[Path], overwrite: bool,
              cleaning: dict[str, int]) -> RegistryEntry | None:
    """Save what was trained (every process takes part: ZeRO-3 gathers its shards), then, on the main process
    only, merge the adapter into a fresh full-precision copy of the base (never the 4-bit one QLoRA trained on),
    cast to the parent's dtype and move the folder into the registry. Other processes return None."""
    trained = run_dir / ("adapter" if recipe.lora is not None else "trained")
    trainer.save_model(str(trained))
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return None
    return _add_trained(recipe, trained, tokenizer, registry, base, output, run_dir, train_files, overwrite, cleaning)


def _add_trained(recipe: Recipe, trained: Path, tokenizer: Any, registry: Registry, base: RegistryEntry, output: str,
                 run_dir: Path, train_files: list[Path], overwrite: bool, cleaning: dict[str, int]) -> RegistryEntry:
    import torch

    config = json.loads((base.path / "config.json").read_text())
    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    if recipe.lora is not None:
        from peft import PeftModel

        full, _ = _load_model(recipe.model_copy(update={"qlora": False}), base.path)
        model = PeftModel.from_pretrained(full, trained).merge_and_unload()
    else:
        model, _ = _load_model(recipe, trained)
    staging = run_dir / "final"
    shutil.rmtree(staging, ignore_errors=True)
    model.to(dtype).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    manifest = ModelManifest(name=output, parent=base.name, method=recipe.method, recipe=recipe.resolved(),
                             recipe_digest=recipe.digest(), data_digest=data_digest(train_files),
                             source=f"zephyr train {recipe.method}", stats={"data_cleaning": cleaning})
    return registry.add(staging, manifest, move=True, overwrite=overwrite, parent_revision=base.manifest.revision)


def register_run(recipe: Recipe, settings: Settings, *, recipe_path: Path | None = None,
                 overwrite: bool = False) -> RunResult:
    """`zephyr train register`: register a run trained on another machine (a GPU box), its run folder copied into
    this one's `runs/`. It is merged and added exactly as `train` would have, after checking that the folder was
    trained by this recipe on the data files this machine holds. The base must hold the same weights (the bundled
    entry is made alike everywhere from its GGUF; its sha256 is checked when it is made)."""
    registry = Registry(settings.models_dir)
    base = trainable_base(registry, recipe.model)
    output = check_name(recipe.output_name(recipe_path))
    check_output_free(registry, output, overwrite, recipe.model)
    if recipe.data is None or recipe.method == "rs":  # rejection sampling writes its data as it runs
        raise TrainingError(f"only a recipe with its own data files can be registered from a run folder, not this "
                            f"{recipe.method} recipe")
    run_dir = settings.home / "runs" / output
    trained = run_dir / ("adapter" if recipe.lora is not None else "trained")
    started = run_dir / RECIPE_FILE
    if not trained.is_dir() or not started.is_file():
        raise TrainingError(f"{run_dir} holds no finished run ({trained.name}/ and {RECIPE_FILE}): copy the whole run "
                            "folder of a finished `zephyr train` here")
    saved = run_file(started)
    data = data_digest([*recipe.data.train, *recipe.data.eval])
    if saved.get("digest") != recipe.digest():
        raise TrainingError(f"{run_dir} was trained by another recipe (digest {saved.get('digest')}, this one "
                            f"{recipe.digest()}): register it with the recipe and overrides it ran with")
    if saved.get("data_digest") != data:
        raise TrainingError(f"{run_dir} was trained on other data than "
                            f"{', '.join(map(str, [*recipe.data.train, *recipe.data.eval]))} hold here (or records "
                            "none: an older version's folder): copy the run's data files too")
    if saved.get("base_weights") != weights_digest(base.path):
        raise TrainingError(f"{run_dir} adapts other weights than {base.name!r} holds here (or records none: an "
                            "older version's folder): its base must be the same checkpoint on both machines")
    cleaning = checked_cleaning(recipe.data.train, recipe.data, make_console(), recipe.data.eval)
    entry = _add_trained(recipe, trained, _load_tokenizer(base.path), registry, base, output, run_dir,
                         recipe.data.train, overwrite, cleaning)
    for part in ("validation", "heldout"):  # a reward model's agreement, as scored where it trained
        if (scored := run_dir / f"{part}-agreement.json").is_file():
            registry.record_eval(entry.name, f"{part}_agreement", run_file(scored),
                                 made_at=entry.manifest.created_at)
    summary = run_dir / "summary.json"
    metrics = run_file(summary).get("metrics", {}) if summary.is_file() else {}
    return RunResult(entry=entry, run_dir=run_dir, metrics=metrics)
