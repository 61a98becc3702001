"""MCQ scoring without an engine: a model that always answers "A" must score exactly the share of A keys, in
letter format (our scorer, the service's computation) and in cloze form (lm-eval running our task YAMLs)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from evals import mcq_eval
from zephyr import mcq
from zephyr.schemas import MCQItem

KEYS = "AABCDDDBCA" + "CB"  # 3 of 12 keys are A


def items(subjects: bool = False) -> list[MCQItem]:
    return [MCQItem(id=f"q{i}", question=f"Which number is {i}?", options=[f"{i}", f"{i + 1}", f"{i + 2}", f"{i + 3}"],
                    answer=key, subject=("college_physics" if i % 2 else "world_religions") if subjects else None)
            for i, key in enumerate(KEYS)]


class AlwaysA:
    """An engine whose letter log-probabilities always favour A (a made-up, fixed distribution)."""

    def __init__(self):
        self.prompts = []

    def generate(self, prompts, params, use_tqdm=True):
        outputs = []
        for prompt, param in zip(prompts, params, strict=True):
            self.prompts.append(prompt)
            ids = param.allowed_token_ids
            logprobs = {tid: SimpleNamespace(logprob=-0.1 if n == 0 else -3.0 - n) for n, tid in enumerate(ids)}
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(logprobs=[logprobs])]))
        return outputs


def test_letter_format_always_a_scores_the_share_of_a_keys(tokenizer):
    engine = AlwaysA()
    m = mcq_eval.letter(engine, tokenizer, "arc_easy", "test", items(subjects=True))
    assert m.score == pytest.approx(KEYS.count("A") / len(KEYS))
    assert set(m.details["answers"].values()) == {"A"}
    assert m.items == {f"q{i}": float(k == "A") for i, k in enumerate(KEYS)}
    assert m.groups["world_religions"] == pytest.approx(KEYS[::2].count("A") / 6)
    assert m.groups["college_physics"] == pytest.approx(KEYS[1::2].count("A") / 6)
    assert "stem" in m.groups  # college_physics is a STEM subject
    # The prompt is the service's prompt, token for token.
    question = mcq.MCQuestion(items()[0].question, tuple(items()[0].options))
    assert engine.prompts[0]["prompt_token_ids"] == mcq.encode_prompt(tokenizer, question)


class AlwaysFirstOption:
    """An lm-eval model whose log-likelihood always prefers the first option's continuation."""

    def __new__(cls):
        from lm_eval.api.model import LM

        class _Model(LM):
            def loglikelihood(self, requests, disable_tqdm=False):
                return [(0.0, True) if r.idx == 0 else (-5.0, False) for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def generate_until(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _Model()


@pytest.mark.parametrize("benchmark", ["arc_easy", "mmlu", "sciq", "openbookqa"])
def test_cloze_tasks_always_a_scores_the_share_of_a_keys(tmp_path, benchmark):
    data = items(subjects=benchmark == "mmlu")
    (m_acc, m_norm) = mcq_eval.cloze(AlwaysFirstOption(), {benchmark: ("test", data)}, tmp_path)
    assert (m_acc.metric, m_norm.metric) == ("cloze_acc", "cloze_acc_norm")
    assert m_acc.score == pytest.approx(KEYS.count("A") / len(KEYS))
    assert m_acc.items == {f"q{i}": float(k == "A") for i, k in enumerate(KEYS)}
    if benchmark == "mmlu":
        assert set(m_acc.groups) == {"college_physics", "world_religions", "stem"}


def test_task_yaml_reads_the_given_file(tmp_path):
    config = mcq_eval.task_config("arc_challenge", tmp_path / "items.jsonl")
    assert config["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "items.jsonl")
    assert config["task"] == "zephyr_arc_challenge" and config["output_type"] == "multiple_choice"
