"""How a conversation becomes prompt token ids: the model's chat template with the assistant's turn opened, then
tokenized without adding special tokens (the template already wrote them). The service, the offline engine and
rejection sampling all encode this way, so a model sees the same prompt served, evaluated and trained on."""

from __future__ import annotations

import re
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


def control_tokens(tokenizer: Any) -> re.Pattern[str] | None:
    """The tokenizer's special tokens as one pattern (longest first), or None for a tokenizer without any. The
    tokenizer reads "<|im_start|>" spelled in a client's text as the real marker, so text that goes into a prompt
    the model then writes after (a chat, `/mcq`'s `explain`) must not spell one."""
    special = set(tokenizer.all_special_tokens) | {
        token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special}
    tokens = sorted((token for token in special if token), key=len, reverse=True)
    return re.compile("|".join(re.escape(token) for token in tokens)) if tokens else None
