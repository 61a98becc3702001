"""Preference statistics: a tiny random Llama reward model, fixed-number win rates and score statistics, and win
rates from a review export made by the real exporter (service/review/export.py)."""

from __future__ import annotations

import json

import pytest

from evals.preference import human_win_rates, rm_human_agreement, rm_win_rate, score_stats
from offline.reward import RewardModel, pair_agreement
from offline.stats import wilson
from tests.unit.review_export import write_dpo_export

WORDS = "the a sun is hot cold plants make sugar from light water what why how answer question".split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def tiny_reward_model(folder):
    """A randomly initialised 2-layer Llama sequence classifier; its tokenizer has a chat template, no pad token."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    specials = ["<|end|>", "[UNK]", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {tok: i for i, tok in enumerate([*specials, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", unk_token="[UNK]")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, num_labels=1,
                         eos_token_id=0, pad_token_id=None)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    return folder


def chat(question: str, answer: str) -> list[dict]:
    return [{"role": "system", "content": "answer the question"}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


CONVERSATIONS = [chat("why is the sun hot", "the sun is hot"), chat("what do plants make", "sugar"),
                 chat("how", "plants make sugar from light and water " * 10), chat("what", "")]


def test_reward_model_scores_each_conversation_deterministically(tmp_path):
    rm = RewardModel.load(tiny_reward_model(tmp_path / "rm"), max_length=48)
    assert rm.tokenizer.pad_token == "<|end|>" and rm.model.config.pad_token_id == 0  # pad falls back to EOS
    scores = rm.score(CONVERSATIONS, batch_size=8)
    assert len(scores) == len(CONVERSATIONS) and all(isinstance(s, float) for s in scores)
    assert rm.score(CONVERSATIONS, batch_size=8) == scores
    # Right padding must not change a score.
    assert rm.score(CONVERSATIONS, batch_size=1) == pytest.approx(scores, abs=1e-5)
    # The chat template renders the conversation; the answer's end survives left truncation.
    assert rm.render(CONVERSATIONS[0]).endswith("<|assistant|> the sun is hot <|end|> ")
    ids = rm.tokenizer([rm.render(CONVERSATIONS[2])], truncation=True, max_length=48)["input_ids"][0]
    assert len(ids) == 48 and ids[-1] == 0


def test_reward_model_needs_an_answer_and_a_folder(tmp_path):
    rm = RewardModel.load(tiny_reward_model(tmp_path / "rm"))
    with pytest.raises(ValueError, match="does not end with an assistant message"):
        rm.score([chat("why", "because")[:2]])
    with pytest.raises(FileNotFoundError):
        RewardModel.load(tmp_path / "absent")


def test_score_stats_on_fixed_numbers():
    assert score_stats([1.0, 2.0, 3.0, 4.0]) == {"n": 4, "mean": 2.5, "median": 2.5,
                                                  "std": pytest.approx(1.2909944487358056), "min": 1.0, "max": 4.0}
    assert score_stats([5.0]) == {"n": 1, "mean": 5.0, "median": 5.0, "std": 0.0, "min": 5.0, "max": 5.0}
    assert score_stats([])["n"] == 0


def test_rm_win_rate_on_fixed_numbers():
    a = {"q1": 1.0, "q2": 0.5, "q3": -1.0, "q4": 2.0, "only_a": 9.0}
    b = {"q1": 0.0, "q2": 0.5, "q3": 0.0, "q4": 1.0, "only_b": -9.0}
    assert rm_win_rate(a, b) == {"wins": 2, "losses": 1, "ties": 1, "n": 4, "win_rate": 0.625,
                                 "ci95": wilson(2.5, 4)}
    assert rm_win_rate(b, a)["win_rate"] == 0.375
    # a score that is no number is no comparison (it counted as a tie)
    assert rm_win_rate({**a, "q5": float("nan")}, {**b, "q5": 1.0}) == rm_win_rate(a, b)
    with pytest.raises(ValueError, match="no common item ids"):
        rm_win_rate({"x": 1.0}, {"y": 1.0})


def export_file(tmp_path):
    """A DPO export written by the real exporter from hand-made verdicts: two served models (tutor-a, tutor-b)
    and their candidates, a resampled one (`tutor-a [T=1]`) and a remote one (`big`)."""
    cases = [  # (served model, candidate model, candidate variant, labels by reviewers)
        ("tutor-a", "tutor-a", "T=1", ["served", "served"]),
        ("tutor-a", "tutor-a", "T=1", ["candidate"]),
        ("tutor-a", "big", None, ["candidate", "candidate", "served"]),
        ("tutor-b", "big", None, ["served"]),
        ("tutor-b", "big", None, ["tie"]),  # not a DPO pair
        ("tutor-b", "big", None, ["served", "candidate"]),  # no majority: left out
    ]
    path, count = write_dpo_export(tmp_path / "dpo.jsonl", cases)
    assert count == 4
    return path


def test_human_win_rates_from_a_real_export(tmp_path):
    path = export_file(tmp_path)
    first = json.loads(path.read_text().splitlines()[0])
    assert {"chosen_model", "rejected_model", "label", "item_ids"} <= set(first["meta"])

    result = human_win_rates(path)
    assert result["pairs"] == 4 and result["without_models"] == 0
    served = result["served_vs_candidate"]
    assert (served["served_wins"], served["candidate_wins"], served["n"]) == (2, 2, 4)
    assert served["served_win_rate"] == 0.5
    lo, hi = served["ci95"]
    assert 0.0 < lo < 0.5 < hi < 1.0
    models = {row["model"]: row for row in result["models"]}
    assert {m: (r["wins"], r["losses"]) for m, r in models.items()} == {
        "big": (1, 1), "tutor-a": (1, 2), "tutor-a [T=1]": (1, 1), "tutor-b": (1, 0)}
    assert models["tutor-a"]["win_rate"] == pytest.approx(1 / 3)
    heads = {(h["a"], h["b"]): (h["a_wins"], h["b_wins"]) for h in result["head_to_head"]}
    assert heads == {("big", "tutor-a"): (1, 0), ("big", "tutor-b"): (0, 1), ("tutor-a", "tutor-a [T=1]"): (1, 1)}


def test_a_pair_of_one_models_answers_is_neither_a_win_nor_a_loss():
    """Counted as both before: 8 wins over b and 10 pairs of a against a read 18 of 30 (60%) instead of 8 of 10."""
    def pair(chosen: str, rejected: str) -> dict:
        return {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}], "source": "zephyr-review",
                "meta": {"label": "served", "chosen_model": chosen, "rejected_model": rejected}}

    records = [pair("a", "b")] * 8 + [pair("b", "a")] * 2 + [pair("a", "a")] * 10
    models = {row["model"]: row for row in human_win_rates(records)["models"]}
    assert (models["a"]["wins"], models["a"]["losses"], models["a"]["win_rate"]) == (8, 2, 0.8)


def test_human_win_rates_without_model_names_still_counts_served_vs_candidate():
    records = [{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}], "source": "zephyr-review",
                "meta": {"label": label}} for label in ("served", "served", "candidate")]
    result = human_win_rates(records)
    assert result["without_models"] == 3 and result["models"] == []
    assert result["served_vs_candidate"]["served_win_rate"] == pytest.approx(2 / 3)


class FixedScorer:
    """Scores an answer by its length: a stand-in reward model that prefers longer answers."""

    def score(self, conversations, batch_size=8):
        return [float(len(c[-1]["content"])) for c in conversations]


def pairs(chosen_rejected):
    return [{"prompt": [{"role": "user", "content": f"q{n}"}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}], "source": "zephyr-review",
             "meta": {"item_ids": [f"item{n}"]}} for n, (c, r) in enumerate(chosen_rejected)]


def test_rm_human_agreement_with_a_hand_built_scorer():
    always = rm_human_agreement(FixedScorer(), pairs([("longer answer", "short"), ("a good reply", "no")]))
    assert always["n"] == 2 and always["agreement"] == 1.0 and always["ties"] == 0
    assert always["items"] == {"item0": 1.0, "item1": 1.0}
    mixed = rm_human_agreement(FixedScorer(), pairs([("long answer", "x"), ("y", "long answer"), ("ab", "cd")]))
    assert mixed["agreement"] == pytest.approx(1 / 3) and mixed["ties"] == 1
    lo, hi = mixed["ci95"]
    assert 0.0 <= lo < 1 / 3 < hi <= 1.0
    with pytest.raises(ValueError, match="no preference pairs"):
        rm_human_agreement(FixedScorer(), [])


class ShortestScorer:
    """Prefers the shorter answer: agrees with people exactly where they chose the shorter reply."""

    def score(self, conversations, batch_size=8):
        return [-float(len(c[-1]["content"])) for c in conversations]


def test_agreement_where_people_chose_the_shorter_reply_is_what_length_cannot_explain():
    data = pairs([("longer answer", "short"), ("y", "long answer"), ("no", "nope, never"), ("ab", "cd")])
    by_length = pair_agreement(FixedScorer(), data)["shorter_chosen"]
    assert by_length["n"] == 2 and by_length["agreement"] == 0.0  # a length scorer never agrees there
    against = pair_agreement(ShortestScorer(), data)["shorter_chosen"]
    assert against["n"] == 2 and against["agreement"] == 1.0 and against["ci95"][1] == pytest.approx(1.0)
    assert pair_agreement(FixedScorer(), pairs([("longer answer", "short")]))["shorter_chosen"] == {
        "n": 0, "agreement": None, "ci95": None}


def test_rm_human_agreement_with_the_tiny_reward_model(tmp_path):
    rm = RewardModel.load(tiny_reward_model(tmp_path / "rm"))
    result = rm_human_agreement(rm, export_file(tmp_path))
    assert result["n"] == 4 and 0.0 <= result["agreement"] <= 1.0
    assert set(result["items"]) == {"item0", "item1", "item2", "item3"}
