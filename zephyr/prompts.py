"""How a conversation becomes prompt token ids: the model's chat template with the assistant's turn opened, then
tokenized without adding special tokens (the template already wrote them). The service, the offline engine and
rejection sampling all encode this way, so a model sees the same prompt served, evaluated and trained on."""

from __future__ import annotations

from typing import Any


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)
