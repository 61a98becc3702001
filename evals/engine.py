"""The evaluation engine: the shared offline vLLM engine plus the letter-format and answer-prior scorers, the same
interface as evals.hf_letter.TransformersEngine (letter, lm_eval_model, shutdown; it has no answer_prior)."""

from __future__ import annotations

from typing import Any

from offline.engine import OfflineEngine


class EvalEngine(OfflineEngine):
    def letter(self, name: str, split: str, items: list[Any], explain: bool = False) -> Any:
        from evals import mcq_eval

        return mcq_eval.letter(self.llm, self.tokenizer, name, split, items, explain=explain,
                               explain_max_tokens=self.settings.mcq_explain_max_tokens,
                               max_prompt_tokens=self.settings.max_prompt_tokens)

    def answer_prior(self, name: str, split: str, items: list[Any], context: str, demonstrations: str = "") -> Any:
        from evals import mcq_eval

        return mcq_eval.answer_prior(self.llm, self.tokenizer, name, split, items, context, demonstrations)
