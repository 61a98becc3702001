"""Chat-answer pairs from given samples (the vLLM sampling runs in tests/integration/test_training.py): which
questions can be asked in chat, which answers are right, and which pair each question makes."""

from __future__ import annotations

import pytest

from training.data.chat_answers import ChatSample, askable, build, conversation
from zephyr.schemas import MCQItem

SYSTEM = "You are a tutor."
OPTIONS = ["oxygen", "carbon dioxide", "helium", "neon"]


def item(i: int, question: str = "What gas do plants take in?", answer: str = "B") -> MCQItem:
    return MCQItem(id=f"q{i}", question=question, options=OPTIONS, answer=answer)


def test_questions_that_point_at_options_or_figures_cannot_be_asked_in_chat():
    items = [item(0), item(1, "Which of the following is a gas?"), item(2, "Which of these is a gas?"),
             item(3, "The diagram shows a plant. What does it take in?"), item(4, "A plant takes in"),
             MCQItem(id="dup", question="What is it?", options=["a", "a", "b", "c"], answer="A")]
    kept, left_out = askable(items)
    assert [i.id for i in kept] == ["q0", "q4"] and left_out == 4


def test_a_pair_is_a_right_answer_that_ended_against_a_wrong_one_else_one_naming_nothing():
    right = ChatSample("Plants take in carbon dioxide from the air.", ended=True)
    samples = {
        # a wrong answer beats one naming nothing as the rejected reply
        "q0": [right, ChatSample("Plants take in oxygen.", True), ChatSample("Plants are green.", True)],
        # no wrong answer: the one naming no option is rejected
        "q1": [right, ChatSample("Plants are green.", True)],
        # the right answer was cut at the token limit, or loops: no chosen reply
        "q2": [ChatSample("Carbon dioxide is taken in and", ended=False), ChatSample("Oxygen.", True)],
        "q3": [ChatSample("carbon dioxide goes in. " * 10, ended=True), ChatSample("Oxygen.", True)],
        # naming the key and a distractor is neither right nor wrong
        "q4": [ChatSample("Oxygen or carbon dioxide.", True), ChatSample("Helium.", True)],
        # only right answers: nothing to reject
        "q5": [right, right],
    }
    items = [item(i) for i in range(6)]
    pairs, stats = build(items, samples, SYSTEM)
    by_id = {p.meta["question_id"]: p for p in pairs}
    assert set(by_id) == {"q0", "q1"}
    assert by_id["q0"].meta["rejected"] == "wrong" and by_id["q0"].rejected[0].content == "Plants take in oxygen."
    assert by_id["q1"].meta["rejected"] == "neither" and by_id["q1"].rejected[0].content == "Plants are green."
    assert all(p.chosen[0].content == right.text for p in pairs)
    # The prompt is the chat the text suite sends: the system prompt, then the bare question.
    assert [m.model_dump() for m in by_id["q0"].prompt] == conversation("What gas do plants take in?", SYSTEM)
    assert stats.pairs == {"wrong": 1, "neither": 1} and stats.questions_with_right == 3
    assert stats.verdicts["right"] == 6 and stats.verdicts["both"] == 1 and stats.answers == 13

    only_wrong, stats = build(items, samples, SYSTEM, rejected="wrong")
    assert [p.meta["question_id"] for p in only_wrong] == ["q0"] and stats.pairs == {"wrong": 1}
    assert [m.role for m in build(items, samples, None)[0][0].prompt] == ["user"]  # system prompt disabled
    with pytest.raises(ValueError, match="rejected must be one of"):
        build(items, samples, SYSTEM, rejected="any")


def test_the_cli_refuses_test_and_calibration_splits_and_a_bad_rejected_kind(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.app import app

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    out = tmp_path / "pairs.jsonl"
    for sources, message in (("arc_easy:test", "refusing arc_easy:test"),
                             ("sciq:validation", "refusing sciq:validation")):
        refused = CliRunner().invoke(app, ["data", "chat-answers", "--sources", sources, "--out", str(out)])
        assert refused.exit_code != 0 and message in " ".join(refused.output.split()), sources
    refused = CliRunner().invoke(app, ["data", "chat-answers", "--rejected", "any", "--out", str(out)])
    assert refused.exit_code != 0 and "--rejected must be one of wrong, wrong-or-neither" in \
        " ".join(refused.output.split())
    assert not out.exists()
