"""The letter probe: its DPO loss is TRL's sigmoid loss on one-letter answers, it trains only on direct pairs, and a
short run on a tiny Llama reports checkpoints that move the model. The key probe permutes options so the key's
letter is uniform, never trains on a test split, and starts at a uniform guess's loss."""

from __future__ import annotations

import json
import math

import pytest

from tests.unit.tiny_llama import TINY, make_tiny_llama
from tools.letter_probe import direct_pairs, key_probe, main, pair_loss, permuted, probe
from zephyr.registry import Registry
from zephyr.schemas import MCQItem


def pair(question: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": f"Question: {question}\n\nA. one\nB. two\nC. three\nD. four"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "source": "test"}


def test_dpo_loss_is_log_two_when_policy_is_the_reference_and_falls_as_the_margin_grows():
    import torch

    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -0.5])
    assert pair_loss("dpo", chosen, rejected, chosen, rejected, 0.1).item() == pytest.approx(math.log(2))
    moved = pair_loss("dpo", chosen + 1, rejected - 1, chosen, rejected, 0.1).item()
    assert moved == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))))
    assert pair_loss("sft", chosen, rejected, chosen, rejected, 0.1).item() == pytest.approx(1.5)


def test_only_one_letter_pairs_are_probed(tmp_path):
    path = tmp_path / "pairs.jsonl"
    explain = pair("q3", "Plants make food, so the answer is B.", "It is A.")
    path.write_text("\n".join(json.dumps(r) for r in [pair("q1", "B", "A"), explain, pair("q2", "C", "D")]))
    assert [r["chosen"][0]["content"] for r in direct_pairs(path)] == ["B", "C"]
    path.write_text(json.dumps(explain))
    with pytest.raises(ValueError, match="single option letters"):
        direct_pairs(path)


def test_a_short_probe_reports_each_checkpoint(tmp_path, default_model):
    tiny = make_tiny_llama(Registry(tmp_path / "models"), default_model)
    pairs = [pair(f"q{i}", "ABCD"[i % 4], "ABCD"[(i + 1) % 4]) for i in range(12)]
    items = [MCQItem(id=str(i), question=f"q{i}", options=["one", "two", "three", "four"], answer="ABCD"[i % 4])
             for i in range(6)]
    results = probe(tiny.path, pairs, items, steps=2, batch_size=4, eval_every=1, held_out=4, lr=1e-2)
    assert [c.step for c in results] == [0, 1, 2]
    assert results[0].train_loss is None and results[1].train_loss == pytest.approx(math.log(2), abs=1e-3)
    assert all(sum(c.predicted.values()) == len(items) and 0 <= c.accuracy <= 1 for c in results)
    with pytest.raises(ValueError, match="need 40 training pairs"):
        probe(tiny.path, pairs, items, steps=10, batch_size=4, held_out=4)


def test_permuted_options_keep_the_key_and_spread_its_letter():
    import random
    from collections import Counter

    item = MCQItem(id="q", question="Which is a gas?", options=["iron", "oxygen", "salt", "ice"], answer="B")
    rng = random.Random(0)
    draws = [permuted(item, rng) for _ in range(400)]
    assert all(question.options[key] == "oxygen" and sorted(question.options) == sorted(item.options)
               for question, key in draws)
    letters = Counter(key for _, key in draws)
    assert set(letters) == {0, 1, 2, 3} and min(letters.values()) > 60  # ~100 each: no letter to learn
    with_passage = item.model_copy(update={"support": "Oxygen is a gas at room temperature."})
    question, _ = permuted(with_passage, rng)  # asked as /mcq asks it: the passage kept
    assert question.support == "Oxygen is a gas at room temperature."


def test_key_probe_starts_at_a_uniform_guess_and_reports_each_checkpoint(tmp_path, default_model):
    tiny = make_tiny_llama(Registry(tmp_path / "models"), default_model)
    train = [MCQItem(id=f"t{i}", question=f"train question {i}", options=["one", "two", "three", "four"],
                     answer="ABCD"[i % 4]) for i in range(10)]
    items = [MCQItem(id=str(i), question=f"q{i}", options=["one", "two", "three", "four"], answer="ABCD"[i % 4])
             for i in range(6)]
    results = key_probe(tiny.path, train, items, steps=2, batch_size=4, eval_every=1, held_out=2, lr=1e-2)
    assert [c.step for c in results] == [0, 1, 2]
    # A random tiny model's letter logits are nearly equal: cross-entropy over four letters is ln 4.
    assert results[0].train_loss is None and results[1].train_loss == pytest.approx(math.log(4), abs=0.02)
    assert all(sum(c.predicted.values()) == len(items) and 0 <= c.held_out_accuracy <= 1 for c in results)


@pytest.mark.parametrize("args,message", [
    ([], "exactly one of --data"),
    (["--splits", "arc_easy:train", "--objective", "dpo"], "DPO needs --data pairs"),
    (["--splits", "arc_easy:train,arc_easy:test"], "refusing arc_easy:test"),  # the builders' guard
    (["--splits", "arc_easy"], "is not name:split"),
])
def test_cli_says_what_to_fix(args, message, refused_tool_output):
    assert message in refused_tool_output(main, args)


def test_the_key_probe_never_scores_a_question_it_trains_on(tmp_path, monkeypatch, default_model):
    """`--splits sciq:validation` with the default --eval-split would train on the very questions it scores."""
    import typer
    from typer.testing import CliRunner

    home, data = tmp_path / "home", tmp_path / "data"
    make_tiny_llama(Registry(home / "models"), default_model)
    (data / "sciq").mkdir(parents=True)
    rows = [{"question": f"Which gas do plants take in number {i}?", "correct_answer": "carbon dioxide",
             "distractor1": "oxygen", "distractor2": "neon", "distractor3": "argon", "support": ""} for i in range(3)]
    (data / "sciq" / "valid.json").write_text(json.dumps(rows))
    monkeypatch.setenv("ZEPHYR_HOME", str(home))
    monkeypatch.setenv("ZEPHYR_DATA_DIR", str(data))
    app = typer.Typer()
    app.command()(main)
    result = CliRunner().invoke(app, ["--model", TINY, "--splits", "sciq:validation", "--benchmark", "sciq"])
    assert result.exit_code == 2, result.output
    assert "every scored sciq validation question is among the training ones" in " ".join(
        result.output.replace("│", " ").split())
