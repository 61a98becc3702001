"""How a conversation becomes prompt token ids: the model's chat template with the assistant's turn opened, then
tokenized without adding special tokens (the template already wrote them). The service, the offline engine and
rejection sampling all encode this way, so a model sees the same prompt served, evaluated and trained on."""

from __future__ import annotations

from typing import Any


def with_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """The conversation the model reads: the tutor's system prompt first when the client sent none (None: the
    server's is off). Served chats and rejection sampling's prompts get it alike, so the answers a reward model
    ranks and trains on are answers to what students' chats look like to the model."""
    if system_prompt is None or any(m["role"] == "system" for m in messages):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)
