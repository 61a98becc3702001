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

# Reasoning shorter than this before the answer line is no explanation: the format reward asks for one, in words of
# its own (a run of one character, or the question echoed back, is none).
MIN_REASONING_CHARS = 20
MIN_NEW_WORDS = 3
_WORD = re.compile(r"[a-z]{2,}")
_CUE = re.compile("|".join(re.escape(stop) for stop in mcq.EXPLAIN_STOP))
# After the cue: spaces, and optional markup a small model writes around a letter ("**B**", "(B)"), then the letter
# and what follows it on the line.
_LETTER = re.compile(r"[\s*(\[]*([A-Z])(?![A-Za-z])([*)\]]*)([^\n]*)")
# "A" and "I" are also English words: "Answer: A plant makes sugar" or "Answer: I think it is B" name no option, while
# "Answer: A is right", "Answer: A, because" and "Answer: (A) the moon" do. After another letter any text reads as
# the option's ("B because").
_WORD_LETTERS = "AI"
_AFTER_A_LETTER = re.compile(r"\s*(?:$|[.,:;!?)\]*\-\u2013\u2014]|(?:is|because|since|as|would|will)\b)")


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
    if found is None or found.group(1) not in letters:
        return None
    letter, closed, rest = found.groups()
    if letter in _WORD_LETTERS and not closed and rest.strip() and not _AFTER_A_LETTER.match(rest):
        return None  # the article or the pronoun, not an option
    return letter


def correct_letter(completions: Sequence[Any], answer: Sequence[str], letters: Sequence[str],
                   **_: Any) -> list[float]:
    """1.0 when the explained answer's letter is the key, else 0.0 (a missing or invalid letter included)."""
    return [float(answer_letter(completion_text(c), valid) == key)
            for c, key, valid in zip(completions, answer, letters, strict=True)]


def answer_format(completions: Sequence[Any], letters: Sequence[str], prompts: Sequence[Any] | None = None,
                  **_: Any) -> list[float]:
    """1.0 for reasoning of at least MIN_REASONING_CHARS holding MIN_NEW_WORDS distinct words the prompt does not,
    then an answer line with a valid letter; else 0.0."""
    texts = [completion_text(c) for c in completions]
    asked = [set(_WORD.findall(completion_text(p).lower())) for p in prompts] if prompts else [set()] * len(texts)
    return [float(answer_letter(text, valid) is not None  # a valid letter implies an answer line
                  and len(reasoning := served_reasoning(text)) >= MIN_REASONING_CHARS
                  and len(set(_WORD.findall(reasoning.lower())) - seen) >= MIN_NEW_WORDS)
            for text, valid, seen in zip(texts, letters, asked, strict=True)]


def served_reasoning(text: str) -> str:
    """The reasoning /mcq explain keeps: the text before the first answer line (generation stops there), else all,
    stripped at both ends as the service strips it before appending the cue."""
    cue = _CUE.search(text)
    return (text[:cue.start()] if cue else text).strip()


class ServedLetter:
    """1.0 when the letter `/mcq` with `explain` would serve is the key, read as the service reads it: the prompt,
    the reasoning up to the first answer line, `mcq.FINAL_ANSWER_CUE`, then the most likely option-letter token,
    scored by the policy being trained (`bind` gives it the model once the trainer holds it). A completion needs no
    answer line of its own, as a served one does not: the service appends the cue."""

    __name__ = "served_letter"  # TRL names the logged reward after it

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None

    def bind(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def letters_of(self, prompts: Sequence[Any], completions: Sequence[Any], letters: Sequence[str]) -> list[str]:
        if self.model is None:
            raise RuntimeError("ServedLetter needs the policy: call bind(model, tokenizer) before training")
        chosen = []
        # TRL scores rewards while the policy trains: dropout (LoRA's included) would make the served letter random.
        was_training = self.model.training
        self.model.eval()
        try:
            for prompt, completion, valid in zip(prompts, completions, letters, strict=True):
                chosen.append(self._letter(prompt, completion, valid))
        finally:
            self.model.train(was_training)
        return chosen

    def served_ids(self, prompt: Any, completion: Any) -> list[int]:
        """What the service would score the letter after: the prompt, the served reasoning, the cue."""
        head = (prompt if isinstance(prompt, str) else
                self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True))
        text = head + mcq.answer_cue_after(served_reasoning(completion_text(completion)))
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _letter(self, prompt: Any, completion: Any, valid: str) -> str:
        import torch

        ids = self.served_ids(prompt, completion)
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], device=self.model.device)).logits[0, -1]
        options = mcq.letter_token_ids(self.tokenizer, len(valid), leading_space=True)
        return valid[int(torch.argmax(logits[options]))]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str],
                 letters: Sequence[str], **_: Any) -> list[float]:
        return [float(got == key) for got, key in zip(self.letters_of(prompts, completions, letters), answer,
                                                      strict=True)]


REWARDS = {"correct_letter": correct_letter, "answer_format": answer_format, "served_letter": ServedLetter}
