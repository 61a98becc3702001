"""Reward-model scoring, shared by evaluation (win rates) and training (rejection sampling). Reward models are the
sequence classifiers `training/` makes with TRL's RewardTrainer: one logit, conversational data rendered with the
tokenizer's chat template, exactly as the trainer rendered it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Conversation = list[dict[str, Any]]
PROGRESS_MIN_BATCHES = 4  # fewer batches than this finish before a progress bar says anything useful


class RewardModel:
    """A one-logit sequence classifier scoring whole conversations (prompt messages + the assistant answer)."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        if tokenizer.chat_template is None:
            raise ValueError("the reward model's tokenizer has no chat template: conversations cannot be rendered "
                             "the way TRL's RewardTrainer rendered them in training")
        # As RewardTrainer does: pad with the pad token, else end-of-sequence, and tell the model, which scores
        # the last token that is not padding. Right padding, as its collator; truncation keeps the answer's end.
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.pad_token is None:
            raise ValueError("the reward model's tokenizer has neither a pad nor an end-of-sequence token")
        model.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"

    @classmethod
    def load(cls, path: str | Path, *, max_length: int | None = 2048, device: str = "cpu") -> RewardModel:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a model folder (no config.json); give a reward model "
                                    f"folder, e.g. a registry entry made with method 'rm'")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
        model.to(device).eval()
        return cls(model, tokenizer, max_length=max_length)

    def render(self, conversation: Conversation) -> str:
        # TRL applies the chat template to the full conversation, with no generation prompt and no added EOS.
        return self.tokenizer.apply_chat_template(conversation, tokenize=False)

    def score(self, conversations: list[Conversation], batch_size: int = 8) -> list[float]:
        """One reward (the raw logit) per conversation; each must end with the assistant's answer."""
        import torch
        from tqdm.auto import tqdm

        for number, conversation in enumerate(conversations):
            if not conversation or conversation[-1].get("role") != "assistant":
                raise ValueError(f"conversation {number} does not end with an assistant message")
        texts = [self.render(c) for c in conversations]
        starts = range(0, len(texts), batch_size)
        device = next(self.model.parameters()).device
        scores: list[float] = []
        with torch.inference_mode():
            for start in tqdm(starts, desc="reward model", unit="batch", disable=len(starts) < PROGRESS_MIN_BATCHES):
                # The template already wrote any BOS token; the tokenizer must not add another (as TRL).
                inputs = self.tokenizer(texts[start:start + batch_size], add_special_tokens=False, padding=True,
                                        truncation=self.max_length is not None, max_length=self.max_length,
                                        return_tensors="pt")
                logits = self.model(input_ids=inputs["input_ids"].to(device),
                                    attention_mask=inputs["attention_mask"].to(device)).logits
                scores.extend(float(v) for v in logits[:, 0].tolist())
        return scores
