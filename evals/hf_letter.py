"""Letter-format scoring through transformers, for checkpoints vLLM cannot load on this machine (bitsandbytes 4-bit
without a CUDA GPU). It computes what `evals.mcq_eval.letter` computes: the prompt of `zephyr.mcq.encode_prompt`,
the next token's log-probabilities restricted to the option letters' token ids, renormalized by
`zephyr.mcq.letter_distribution`."""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evals.mcq_eval import _groups, question_of
from evals.results import Measurement, measurement
from offline.engine import LM_EVAL_TOKENIZATION
from zephyr import mcq
from zephyr.schemas import MCQItem

BATCH_SIZE = 16


def left_padded(prompts: list[list[int]], tokenizer: Any) -> tuple[Any, Any, Any]:
    """Token ids, attention mask and position ids of prompts left-padded to one width, so each prompt's next
    token is the last position."""
    import torch

    # Padding is masked out, so any id works; the tokenizer's pad (else eos) keeps the ids in the vocabulary.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def letter_logprobs(model: Any, tokenizer: Any, items: list[MCQItem], batch_size: int = BATCH_SIZE,
                    desc: str = "letter format") -> list[list[float]]:
    """For each item, the next-token log-probabilities (over the whole vocabulary) of its option letters, in
    letter order. Prompts are batched by length, left-padded, with an attention mask and matching positions."""
    import torch

    prompts = [mcq.encode_prompt(tokenizer, question_of(item)) for item in items]
    letter_ids = [mcq.letter_token_ids(tokenizer, len(item.options)) for item in items]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]), reverse=True)
    out: list[list[float]] = [[] for _ in items]
    progress = tqdm(total=len(items), desc=desc)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start: start + batch_size]
            ids, mask, positions = left_padded([prompts[i] for i in batch], tokenizer)
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                           position_ids=positions.to(model.device), logits_to_keep=1).logits[:, -1, :]
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(batch):
                out[i] = logprobs[row, letter_ids[i]].tolist()
            progress.update(len(batch))
    progress.close()
    return out


def letter_hf(model: Any, tokenizer: Any, name: str, split: str, items: list[MCQItem],
              batch_size: int = BATCH_SIZE) -> Measurement:
    """Letter-format accuracy as `evals.mcq_eval.letter` measures it, through a transformers model."""
    started = time.perf_counter()
    all_logprobs = letter_logprobs(model, tokenizer, items, batch_size, desc=f"{name} letter format")
    seconds = time.perf_counter() - started
    answers, values, probabilities, renormalized = {}, {}, {}, {}
    for item, logprobs in zip(items, all_logprobs, strict=True):
        probs, answer = mcq.letter_distribution(mcq.LETTERS[: len(item.options)], logprobs)
        answers[item.id], values[item.id] = answer, float(answer == item.answer)
        probabilities[item.id] = round(probs[answer], 6)
        renormalized[item.id] = mcq.log_softmax(logprobs)  # whole, as the vLLM path keeps them: `auto` reads them
    return measurement(name, "letter_acc", split, values, groups=_groups(items, values), seconds=seconds,
                       details={"answers": answers, "answer_probability": probabilities,
                                "letter_logprobs": renormalized})


class TransformersEngine:
    """A transformers model and its tokenizer in place of the vLLM EvalEngine: the letter format, and cloze through
    lm-eval's transformers backend (`lm`) wrapping the same loaded model."""

    backend = "transformers"

    def __init__(self, model_path: Path, batch_size: int = BATCH_SIZE):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_path)
        # A pre-quantized checkpoint carries its quantization_config: from_pretrained loads it as it was saved.
        self.model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", device_map=device).eval()
        self.batch_size = batch_size
        self.lm_eval_model: Any = _lm_eval_hf(self.model, self.tokenizer, batch_size)
        self.engine_info = {"backend": self.backend, "device": device, "dtype": str(self.model.dtype).split(".")[-1],
                            "batch_size": batch_size, "torch": torch.__version__,
                            "transformers": _version("transformers"), "bitsandbytes": _version("bitsandbytes")}

    def letter(self, name: str, split: str, items: list[MCQItem]) -> Measurement:
        return letter_hf(self.model, self.tokenizer, name, split, items, self.batch_size)

    def shutdown(self) -> None:
        del self.lm_eval_model, self.model  # lm-eval's wrapper holds the model too


def _lm_eval_hf(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HFLM around an already loaded model, so cloze scores the weights the letter format scores."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **LM_EVAL_TOKENIZATION)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
