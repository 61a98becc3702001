"""Calibration data for GPTQ, AWQ and SmoothQuant: tutoring-style chats built from MCQ training splits.

GPTQ and AWQ fit each layer to the activations the calibration text produces, so it should look like what the
tutor serves: a student's science question, with or without lettered options, and an answer that explains. The
questions come from training splits only (`offline.benchmarks` refuses test and reported splits, and the questions
`zephyr eval calibrate` reads), and every sample is rendered with the model's own chat template, as the service
renders it."""

from __future__ import annotations

import hashlib
import json
import random
from itertools import islice
from pathlib import Path
from typing import Any

from offline.benchmarks import OUTSIDE_CALIBRATION, SourceError, items_outside_calibration
from zephyr import mcq
from zephyr.prompts import with_system_prompt
from zephyr.schemas import DataFileError, MCQItem, SFTExample, read_jsonl

# Training splits only, and none of the questions `zephyr eval calibrate` then fits the quantized entry's /mcq on
# (SciQ has no local train split: its validation split is calibration's).
DEFAULT_SOURCES = OUTSIDE_CALIBRATION


class CalibrationError(ValueError):
    """Calibration data that cannot be used; the message says what to fix."""


def tutoring_chat(item: MCQItem, style: str) -> list[dict[str, str]]:
    """One chat for a question. `mcq`: the service's explain prompt with lettered options; `open`: the question as
    a student would type it in a chat client. The reply uses the item's supporting paragraph when it has one."""
    key_text = item.options[mcq.LETTERS.index(item.answer)]
    support = (item.support or "").strip()
    if style == "mcq":
        question = mcq.MCQuestion(item.question, tuple(item.options))
        reply = f"{support} So the answer is {item.answer}." if support else f"{item.answer}. {key_text} is correct."
        return [*mcq.render_messages(question, explain=True), {"role": "assistant", "content": reply}]
    reply = f"{support} The answer is {key_text}." if support else f"The answer is {key_text}."
    return [{"role": "user", "content": item.question}, {"role": "assistant", "content": reply}]


def from_training_splits(sources: list[str], data_dir: Path, samples: int, seed: int = 0) -> list[list[dict]]:
    """`samples` chats drawn evenly from the sources (name:split), alternating the mcq and open styles."""
    if not sources:
        raise CalibrationError("--calibration-sources names no split; give at least one name:split, e.g. "
                               f"{DEFAULT_SOURCES[0]}")
    rng = random.Random(seed)
    per_source = -(-samples // len(sources))
    chats: list[list[dict]] = []
    for source in sources:
        try:
            items, _ = items_outside_calibration([source], data_dir)
        except SourceError as exc:
            raise CalibrationError(str(exc)) from None
        if not items:  # every question was also in a reported split, and was left out
            raise CalibrationError(f"{source} has no question left to calibrate on once those a reported split "
                                   "holds are left out; name another source or pass --calibration FILE")
        for i, item in enumerate(rng.sample(items, min(per_source, len(items)))):
            chats.append(tutoring_chat(item, "mcq" if i % 2 == 0 else "open"))
    rng.shuffle(chats)
    return chats[:samples]


def from_file(path: Path, samples: int) -> list[list[dict]]:
    """Chats from a JSON Lines file of SFT examples (`{"messages": [...]}`), e.g. `zephyr data` output or an
    export of served conversations. The first `samples` records are used."""
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    try:
        # the first `samples` only: a bad line past them does not fail a run that never reads it
        chats = [[m.model_dump() for m in record.messages]
                 for record in islice(read_jsonl(path, SFTExample), samples)]
    except DataFileError as exc:
        hint = 'calibration files hold SFT examples: one {"messages": [...]} per line'
        raise CalibrationError(f"{exc} ({hint})") from None
    if not chats:
        raise CalibrationError(f"calibration file {path} has no records")
    return chats


def render(chats: list[list[dict]], tokenizer: Any, system_prompt: str | None) -> list[str]:
    """Each chat as the model reads it when served: the server's system prompt first where the chat has none (as
    zephyr.prompts.with_system_prompt gives it to every served chat; None: the server's is off). Without it the
    template put its own default there (SmolLM2's "You are a helpful AI assistant named SmolLM"), which no student's
    chat shows the model: calibration runs before 2026-12-07 fitted half their samples to that."""
    from jinja2 import TemplateError

    texts = []
    for number, chat in enumerate(chats, 1):
        try:
            texts.append(tokenizer.apply_chat_template(with_system_prompt(chat, system_prompt), tokenize=False))
        except TemplateError as exc:  # Gemma's refuses a system message, Mistral's roles out of turn
            raise CalibrationError(f"calibration chat {number}: the model's chat template refuses it ({exc}); give "
                                   "chats in the order and roles the template takes (--calibration), or serve "
                                   "without a system prompt (ZEPHYR_SYSTEM_PROMPT_ENABLED=false)") from None
    return texts


def write(texts: list[str], path: Path) -> str:
    """Write rendered samples (one {"text"} per line, what the quantization worker reads); return their digest."""
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(data)
    # The written lines, whose newlines inside a sample are escaped: the texts joined by newlines gave ["a\nb"] and
    # ["a", "b"] one digest, though the worker tokenizes and truncates them as different samples.
    return hashlib.sha256(data).hexdigest()
