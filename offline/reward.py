"""Reward-model scoring, shared by evaluation (win rates) and training (rejection sampling). Reward models are the
sequence classifiers `training/` makes with TRL's RewardTrainer: one logit, conversational data rendered with the
tokenizer's chat template, exactly as the trainer rendered it."""

from __future__ import annotations

from collections.abc import Mapping
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



def _last_reply(messages: Conversation | str) -> str:
    """The final reply of a message list; a plain-text continuation (a cloze pair's side) is its own reply."""
    if isinstance(messages, str):
        return messages
    return str(messages[-1].get("content", "")) if messages else ""


def reply_lengths(pair: Mapping[str, Any]) -> tuple[int, int]:
    """The characters of a preference pair's chosen and rejected final replies: what "the longer answer" means in
    `pair_agreement` and in a recipe's `data.balance_lengths`."""
    return len(_last_reply(pair["chosen"])), len(_last_reply(pair["rejected"]))


def pair_agreement(rm: Any, pairs: list[Mapping[str, Any]], batch_size: int = 8) -> dict[str, Any]:
    """Share of preference pairs (`prompt`, `chosen`, `rejected` message lists) on which the reward model scores
    the chosen answer strictly above the rejected one (a tie counts as disagreement; `ties` says how many), with a
    95% Wilson interval. `per_pair` holds 1.0/0.0 in the pairs' order, for paired comparisons. `longer_answer` is
    the baseline a reward model must beat on hh-rlhf: the share whose chosen reply is strictly the longer one."""
    from offline.stats import wilson

    if not pairs:
        raise ValueError("no preference pairs to measure agreement on")
    conversations = []
    for pair in pairs:
        prompt = [dict(m) for m in pair["prompt"]]
        conversations += [prompt + [dict(m) for m in pair["chosen"]], prompt + [dict(m) for m in pair["rejected"]]]
    scores = rm.score(conversations, batch_size=batch_size)
    chosen, rejected = scores[0::2], scores[1::2]
    per_pair = [float(c > w) for c, w in zip(chosen, rejected, strict=True)]
    agree, n = int(sum(per_pair)), len(pairs)
    lengths = [reply_lengths(p) for p in pairs]
    longer = sum(c > w for c, w in lengths)
    # Where people chose the shorter reply, length cannot explain an agreement: what the model learned beyond it.
    against_length = [a for a, (c, w) in zip(per_pair, lengths, strict=True) if c < w]
    shorter_agree = int(sum(against_length))
    return {"n": n, "agreement": agree / n, "ci95": wilson(agree, n),
            "ties": sum(c == w for c, w in zip(chosen, rejected, strict=True)),
            "mean_margin": sum(c - w for c, w in zip(chosen, rejected, strict=True)) / n,
            "longer_answer": longer / n, "longer_answer_ci95": wilson(longer, n),
            "shorter_chosen": {"n": len(against_length),
                               "agreement": shorter_agree / len(against_length) if against_length else None,
                               "ci95": wilson(shorter_agree, len(against_length))},
            "per_pair": per_pair}
