"""GSM8K by generation: 0-shot chain of thought and 5-shot (worked train-split solutions as earlier chat turns),
final-number extraction and exact match. Prompts go through the chat template with the tutoring system
prompt, as a student's question reaches the served tutor."""

from __future__ import annotations

import re
import time
from decimal import Decimal, InvalidOperation
from typing import Any

from evals.results import GSM8K_MODES, Measurement, measurement
from offline.benchmarks import GSM8KItem

COT_INSTRUCTION = "Solve the problem step by step. End with a line of the form \"The answer is N.\""
SHOTS = 5
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, not part of a readable solution
_NUMBER = r"-?[\d,]*\.?\d+"
_ANSWER_IS = re.compile(rf"answer is[:\s]*\$?\s*({_NUMBER})", re.IGNORECASE)
_HASHES = re.compile(rf"####\s*\$?\s*({_NUMBER})")
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str | None:
    """"1,234.50" -> "1234.5", "-3.0" -> "-3", "007" -> "7"; None if it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final number of a solution: after "The answer is" (the format asked for), else after "####" (the
    data set's own), else the last number in the text. Commas, "$", units and a trailing period are dropped."""
    for pattern in (_ANSWER_IS, _HASHES):
        found = pattern.findall(text)
        if found:
            return normalize_number(found[-1])
    numbers = [n for n in _ANY_NUMBER.findall(text) if any(c.isdigit() for c in n)]
    return normalize_number(numbers[-1]) if numbers else None


def is_correct(generated: str, item: GSM8KItem) -> bool:
    predicted = extract_answer(generated)
    return predicted is not None and predicted == normalize_number(item.answer)


def shot_solution(item: GSM8KItem) -> str:
    return f"{_CALCULATOR.sub('', item.solution).strip()}\nThe answer is {item.answer}."


def messages_for(item: GSM8KItem, system_prompt: str | None, shots: list[GSM8KItem]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for shot in shots:
        messages += [{"role": "user", "content": f"{shot.question}\n{COT_INSTRUCTION}"},
                     {"role": "assistant", "content": shot_solution(shot)}]
    messages.append({"role": "user", "content": f"{item.question}\n{COT_INSTRUCTION}"})
    return messages


def evaluate(engine: Any, items: list[GSM8KItem], train: list[GSM8KItem], system_prompt: str | None,
             max_tokens: int = 256, modes: tuple[str, ...] = GSM8K_MODES) -> list[Measurement]:
    out = []
    for mode in modes:
        shots = train[:SHOTS] if mode == "5shot" else []
        started = time.perf_counter()
        texts = engine.chat([messages_for(i, system_prompt, shots) for i in items], max_tokens, f"gsm8k {mode}")
        seconds = time.perf_counter() - started
        values = {i.id: float(is_correct(t, i)) for i, t in zip(items, texts, strict=True)}
        out.append(measurement("gsm8k", f"exact_match_{mode}", "test", values, seconds=seconds, details={
            "generations": {i.id: t for i, t in zip(items, texts, strict=True)},
            "extracted": {i.id: extract_answer(t) for i, t in zip(items, texts, strict=True)}}))
    return out
