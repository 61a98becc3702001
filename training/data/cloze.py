"""Cloze-form verifiable pairs: each training question rendered exactly as `POST /mcq` with `method: cloze` scores it.

The served cloze method scores each option's text as the continuation of `mcq.cloze_context(q)` (lm-eval's
multiple-choice form, no chat template), tokenized by `mcq.cloze_split`. These records are that text:

- a preference pair (`TextPreferencePair`): prompt = the cloze context, chosen = `mcq.cloze_continuation` of the
  key's text, rejected = the same of a distractor's text (drawn uniformly, seeded);
- an SFT example (`TextSFTExample`): the cloze context, then the key's continuation.

Training tokenizes them with the same `mcq.cloze_split` (`tokenize_pair`, `tokenize_completion`), with no special
token and no EOS, so the ids the trainer scores are the ids the service scores, and DPO's summed log-probability
of a reply is exactly the cloze score of that option.

Only training splits are read (ARC-Easy/Challenge train, OpenBookQA train by default); validation splits and any
question `zephyr eval calibrate` reads (OpenBookQA's first train questions, as its dev split is the one reported)
are refused or left out, so calibration stays on questions no model was trained on."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offline.benchmarks import OUTSIDE_CALIBRATION, items_outside_calibration
from zephyr import mcq
from zephyr.schemas import MCQItem, TextPreferencePair, TextSFTExample

SOURCE = "zephyr-cloze"
DEFAULT_SOURCES = OUTSIDE_CALIBRATION


@dataclass
class ClozeStats:
    questions: int = 0  # read from the sources, calibration questions excluded
    reserved: dict[str, int] = field(default_factory=dict)  # source -> calibration questions left out
    skipped: int = 0  # options the MCQ format refuses (duplicates)
    pairs: int = 0
    examples: int = 0
    keys: Counter = field(default_factory=Counter)  # the key's letter, as the question lists its options

    def rows(self) -> list[tuple[str, str]]:
        reserved = ", ".join(f"{s} {n}" for s, n in self.reserved.items()) or "none"
        return [("questions", str(self.questions)), ("left out for calibration", reserved),
                ("skipped (bad options)", str(self.skipped)), ("preference pairs", str(self.pairs)),
                ("SFT examples", str(self.examples)),
                ("key letters", ", ".join(f"{k}:{v}" for k, v in sorted(self.keys.items())))]


def load_items(sources: list[str], data_dir: Path, limit_per_source: int | None = None,
               exclude_reported: bool = True) -> tuple[list[MCQItem], dict[str, int]]:
    """Training items of each "name:split" source, without the questions calibration reads
    (`offline.benchmarks.items_outside_calibration`); returns the items and, per source, how many were left out."""
    return items_outside_calibration(sources, data_dir, limit_per_source, exclude_reported)


def question_of(item: MCQItem) -> mcq.MCQuestion:
    """The question as /mcq receives it (options normalized, a passage kept)."""
    return mcq.MCQuestion.build(item.question, item.options, item.support)


def usable(items: list[MCQItem]) -> tuple[list[tuple[MCQItem, mcq.MCQuestion]], int]:
    """Each item with its question as /mcq receives it, and how many items the MCQ format refuses (left out)."""
    accepted = []
    for item in items:
        try:
            accepted.append((item, question_of(item)))
        except mcq.MCQFormatError:
            pass
    return accepted, len(items) - len(accepted)


def cloze_records(items: list[MCQItem], seed: int = 0, distractors: int = 1) -> tuple[list[TextPreferencePair],
                                                                                      list[TextSFTExample], ClozeStats]:
    """One SFT example per question and `distractors` pairs (at most one per wrong option), the key's continuation
    chosen against a distractor's. Questions the MCQ format refuses are skipped and counted."""
    if distractors < 1:
        raise ValueError(f"distractors must be at least 1, not {distractors}")
    rng = random.Random(seed)
    stats = ClozeStats(questions=len(items))
    pairs: list[TextPreferencePair] = []
    examples: list[TextSFTExample] = []
    accepted, stats.skipped = usable(items)
    for item, question in accepted:
        context = mcq.cloze_context(question)
        key = question.letters.index(item.answer)
        chosen = mcq.cloze_continuation(question.options[key])
        meta = {"question_id": item.id, "key": item.answer, "format": "cloze"}
        stats.keys[item.answer] += 1
        examples.append(TextSFTExample(prompt=context, completion=chosen, meta=meta))
        wrong = [i for i in range(len(question.options)) if i != key]
        for i in rng.sample(wrong, min(distractors, len(wrong))):
            pairs.append(TextPreferencePair(prompt=context, chosen=chosen,
                                            rejected=mcq.cloze_continuation(question.options[i]), source=SOURCE,
                                            meta={**meta, "rejected_letter": question.letters[i]}))
    rng.shuffle(pairs)  # sources mixed, so a recipe's `limit` takes a sample of all of them
    rng.shuffle(examples)
    stats.pairs, stats.examples = len(pairs), len(examples)
    return pairs, examples, stats


# ---- tokenization for training: the served split, no special tokens, no EOS -----------------------------------

def tokenize_pair(tokenizer: Any, prompt: str, chosen: str, rejected: str) -> dict[str, list[int]] | None:
    """DPO's pre-tokenized columns. `prompt_ids + chosen_ids` is `mcq.cloze_split(prompt, chosen)` whole, and
    `chosen_ids` is exactly the continuation /mcq scores (likewise for rejected). None when the two replies do not
    share the context's ids (a token merged across the boundary differently), which DPO's one prompt cannot hold;
    with the default tokenizer no training question does (tests/unit/test_train_cloze.py)."""
    chosen_whole, boundary = mcq.cloze_split(tokenizer, prompt, chosen)
    rejected_whole, _ = mcq.cloze_split(tokenizer, prompt, rejected)
    if chosen_whole[:boundary] != rejected_whole[:boundary] or boundary >= min(len(chosen_whole),
                                                                                len(rejected_whole)):
        return None
    return {"prompt_ids": chosen_whole[:boundary], "chosen_ids": chosen_whole[boundary:],
            "rejected_ids": rejected_whole[boundary:]}


def tokenize_completion(tokenizer: Any, prompt: str, completion: str,
                        end_with_eos: bool = False) -> dict[str, list[int]] | None:
    """SFTTrainer's pre-tokenized columns: the whole `mcq.cloze_split` ids, the loss on the continuation only (and,
    with `end_with_eos`, on the tokenizer's EOS id after it)."""
    ids, boundary = mcq.cloze_split(tokenizer, prompt, completion)
    if boundary >= len(ids):
        return None
    if end_with_eos:
        ids = [*ids, tokenizer.eos_token_id]
    return {"input_ids": ids, "completion_mask": [0] * boundary + [1] * (len(ids) - boundary)}


def tokenize_rows(rows: list[dict[str, Any]], tokenizer: Any, method: str,
                  end_with_eos: bool = False) -> tuple[list[dict[str, list[int]]], int]:
    """Plain-text rows (TextPreferencePair for dpo, TextSFTExample for sft) as the trainer's id columns; returns
    them and how many rows could not be split (dropped)."""
    if method == "dpo":
        encoded = [tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    elif method == "sft":
        encoded = [tokenize_completion(tokenizer, r["prompt"], r["completion"], end_with_eos) for r in rows]
    else:
        raise ValueError(f"plain-text records train with dpo or sft, not {method}")
    kept = [e for e in encoded if e is not None]
    return kept, len(encoded) - len(kept)
