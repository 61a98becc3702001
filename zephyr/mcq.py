"""The one MCQ format: serving, evals and training render questions and read letters through this module,
so an accuracy measured offline is the accuracy the service delivers."""

from __future__ import annotations

import json
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_OPTIONS = 2
MAX_OPTIONS = 10
LETTERS = string.ascii_uppercase[:MAX_OPTIONS]

MCQ_SYSTEM_PROMPT = (
    "You are Zephyr, a science tutor. Read the question and the lettered options carefully and pick the "
    "single best option."
)
DIRECT_INSTRUCTION = "Answer with the letter of the correct option."
EXPLAIN_INSTRUCTION = "Explain your reasoning in a few sentences, then give the letter of the correct option."
# Appended after the tutor's reasoning; the next token is then restricted to " A", " B", ...
FINAL_ANSWER_CUE = "\n\nAnswer:"
# The reasoning stops where the tutor starts its own answer line, so the cue above is never doubled.
EXPLAIN_STOP = ["Answer:", "answer:"]
# Tokens kept free after the reasoning for the answer cue, and for re-tokenization drift.
EXPLAIN_CUE_MARGIN = 8


class MCQFormatError(ValueError):
    """A question that cannot be rendered; the message says what to fix (the service answers 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class MCQuestion:
    question: str
    options: tuple[str, ...]

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]

    @classmethod
    def build(cls, question: Any, options: Sequence[str] | Mapping[str, str]) -> MCQuestion:
        if not isinstance(question, str) or not question.strip():
            raise MCQFormatError("`question` must be a non-empty string", "question")
        return cls(question.strip(), tuple(normalize_options(options)))

    def option_for(self, letter: str) -> str:
        return self.options[self.letters.index(letter)]


def normalize_options(options: Sequence[str] | Mapping[str, str]) -> list[str]:
    """Options as a list, from a list or from an object keyed A, B, C... in order."""
    if isinstance(options, Mapping):
        keys = [str(k).strip().upper() for k in options]
        expected = list(LETTERS[: len(keys)])
        if keys != expected:
            raise MCQFormatError(
                f"`options` keys must be the letters {', '.join(expected) or 'A, B'} in order, got {', '.join(keys)}",
                "options",
            )
        values = list(options.values())
    elif isinstance(options, Sequence) and not isinstance(options, str):
        values = list(options)
    else:
        raise MCQFormatError("`options` must be a list of strings or an object keyed by letters", "options")
    if not MIN_OPTIONS <= len(values) <= MAX_OPTIONS:
        raise MCQFormatError(
            f"`options` must have between {MIN_OPTIONS} and {MAX_OPTIONS} entries, got {len(values)}", "options"
        )
    cleaned = []
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise MCQFormatError(f"option {LETTERS[i]} must be a non-empty string", "options")
        cleaned.append(" ".join(value.split()))
    folded = [v.casefold() for v in cleaned]
    duplicates = sorted({LETTERS[i] for i, v in enumerate(folded) if folded.count(v) > 1})
    if duplicates:
        raise MCQFormatError(f"options {', '.join(duplicates)} are duplicates; each option must differ", "options")
    return cleaned


def render_user_message(q: MCQuestion, explain: bool = False) -> str:
    lines = [f"Question: {q.question}", ""]
    lines += [f"{letter}. {option}" for letter, option in zip(q.letters, q.options, strict=True)]
    lines += ["", EXPLAIN_INSTRUCTION if explain else DIRECT_INSTRUCTION]
    return "\n".join(lines)


def render_messages(q: MCQuestion, explain: bool = False, system_prompt: str | None = MCQ_SYSTEM_PROMPT) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": render_user_message(q, explain)})
    return messages


def render_prompt(tokenizer: Any, q: MCQuestion, explain: bool = False, reasoning: str | None = None) -> str:
    """The full prompt text. Without reasoning the next token is the letter itself ("B"); after reasoning
    the prompt ends with FINAL_ANSWER_CUE and the next token is the letter with a space (" B")."""
    text = tokenizer.apply_chat_template(render_messages(q, explain), tokenize=False, add_generation_prompt=True)
    if reasoning is not None:
        text += reasoning.rstrip() + FINAL_ANSWER_CUE
    return text


def encode_prompt(tokenizer: Any, q: MCQuestion, explain: bool = False, reasoning: str | None = None) -> list[int]:
    """The prompt's token ids exactly as the service sends them to the engine (the template adds specials)."""
    return tokenizer.encode(render_prompt(tokenizer, q, explain, reasoning), add_special_tokens=False)


def letter_token_ids(tokenizer: Any, count: int, leading_space: bool = False) -> list[int]:
    """Token id of each of the first `count` letters; each letter must be exactly one distinct token."""
    ids = []
    for letter in LETTERS[:count]:
        encoded = tokenizer.encode((" " if leading_space else "") + letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise MCQFormatError(f"tokenizer splits option letter {letter!r} into {len(encoded)} tokens")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise MCQFormatError("tokenizer maps two option letters to the same token")
    return ids


def letter_distribution(letters: str, logprobs: Sequence[float]) -> tuple[dict[str, float], str]:
    """Probabilities over exactly the option letters (the letters' log-probabilities renormalized, summing to 1)
    and the most likely letter; ties go to the earlier letter, as argmax does."""
    peak = max(logprobs)
    if not math.isfinite(peak):
        raise ValueError("no option letter has a finite log-probability")
    weights = [math.exp(x - peak) for x in logprobs]
    total = sum(weights)
    probabilities = {letter: w / total for letter, w in zip(letters, weights, strict=True)}
    return probabilities, max(probabilities, key=probabilities.__getitem__)


def read_arc_jsonl(path: Path) -> list[MCQuestion]:
    """Questions from an ARC-format JSON Lines file (`{"question": {"stem", "choices": [{"text"}]}}`); ones
    that cannot be rendered are skipped."""
    items = []
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)["question"]
            try:
                items.append(MCQuestion.build(record["stem"], [choice["text"] for choice in record["choices"]]))
            except MCQFormatError:
                continue
    return items
