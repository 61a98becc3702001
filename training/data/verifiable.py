"""Verifiable MCQ prompts for online RL (`zephyr train grpo`): each training question as `/mcq` with `explain: true`
asks it (`mcq.render_messages(q, explain=True)`: the system prompt, the question, its lettered options, the
instruction to reason and then give a letter), with the key's letter for training/rewards.py to check.

The questions are cloze's (`training.data.cloze.load_items`): training splits only, the questions `zephyr eval
calibrate` reads left out, decontaminated against the test sets when the file is written."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from training.data.cloze import usable
from zephyr import mcq
from zephyr.schemas import MCQItem, Message, VerifiablePrompt

SOURCE = "zephyr-verifiable-mcq"


@dataclass
class PromptStats:
    questions: int = 0
    reserved: dict[str, int] = field(default_factory=dict)  # source -> calibration questions left out
    skipped: int = 0  # options the MCQ format refuses
    keys: Counter = field(default_factory=Counter)

    def rows(self) -> list[tuple[str, str]]:
        reserved = ", ".join(f"{s} {n}" for s, n in self.reserved.items()) or "none"
        return [("questions", str(self.questions)), ("left out for calibration", reserved),
                ("skipped (bad options)", str(self.skipped)), ("prompts", str(sum(self.keys.values()))),
                ("key letters", ", ".join(f"{k}:{v}" for k, v in sorted(self.keys.items())))]


def explain_prompts(items: list[MCQItem], seed: int = 0) -> tuple[list[VerifiablePrompt], PromptStats]:
    """One prompt per question the MCQ format accepts, shuffled (seeded) so a recipe's `limit` samples every
    source."""
    stats = PromptStats(questions=len(items))
    prompts = []
    accepted, stats.skipped = usable(items)
    for item, question in accepted:
        messages = [Message(**m) for m in mcq.render_messages(question, explain=True)]
        prompts.append(VerifiablePrompt(prompt=messages, answer=item.answer, letters=question.letters,
                                        source=SOURCE, meta={"question_id": item.id, "format": "explain"}))
        stats.keys[item.answer] += 1
    random.Random(seed).shuffle(prompts)
    return prompts, stats
