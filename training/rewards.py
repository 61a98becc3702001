"""Verifiable rewards for online RL (GRPO) on MCQ explain prompts: is the explained answer's letter the key, and is
the answer in the form `/mcq` with `explain` reads?

`/mcq` with `explain: true` lets the tutor reason until it writes its own answer line (`mcq.EXPLAIN_STOP`), then
appends `mcq.FINAL_ANSWER_CUE` and reads the option letter that follows. A completion is scored the same way: the
letter is the first option letter after the first `Answer:`, so what GRPO rewards is what the service would serve.

TRL calls each function with the batch's completions and the dataset's other columns as keyword lists; a
conversational completion is a list of messages, a plain one a string."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from zephyr import mcq

# Reasoning shorter than this before the answer line is no explanation: the format reward asks for one.
MIN_REASONING_CHARS = 20
_CUE = re.compile("|".join(re.escape(stop) for stop in mcq.EXPLAIN_STOP))
# After the cue: spaces, and optional markup a small model writes around a letter ("**B**", "(B)").
_LETTER = re.compile(r"[\s*(\[]*([A-Z])(?![A-Za-z])")


def completion_text(completion: Any) -> str:
    """The text of a completion, plain (a string) or conversational (a list of messages)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))


def answer_letter(text: str, letters: str) -> str | None:
    """The option letter the completion answers with: the first letter after its first answer line, when it is one
    of `letters`; None when there is no answer line or no valid letter right after it."""
    cue = _CUE.search(text)
    if cue is None:
        return None
    found = _LETTER.match(text, cue.end())
    return found.group(1) if found and found.group(1) in letters else None


def correct_letter(completions: Sequence[Any], answer: Sequence[str], letters: Sequence[str],
                   **_: Any) -> list[float]:
    """1.0 when the explained answer's letter is the key, else 0.0 (a missing or invalid letter included)."""
    return [float(answer_letter(completion_text(c), valid) == key)
            for c, key, valid in zip(completions, answer, letters, strict=True)]


def answer_format(completions: Sequence[Any], letters: Sequence[str], **_: Any) -> list[float]:
    """1.0 for reasoning of at least MIN_REASONING_CHARS, then an answer line with a valid letter; else 0.0."""
    scores = []
    for c, valid in zip(completions, letters, strict=True):
        text = completion_text(c)
        cue = _CUE.search(text)
        scores.append(float(cue is not None and len(text[:cue.start()].strip()) >= MIN_REASONING_CHARS
                            and answer_letter(text, valid) is not None))
    return scores


REWARDS = {"correct_letter": correct_letter, "answer_format": answer_format}
