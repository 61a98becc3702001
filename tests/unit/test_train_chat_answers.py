"""Chat-answer pairs from given samples (the vLLM sampling runs in tests/integration/test_training.py): which
questions can be asked in chat, which answers are right, and which pair each question makes."""

from __future__ import annotations

import pytest

from tests.unit.tiny_llama import make_tiny_llama
from training.data import chat_answers
from training.data.chat_answers import ChatSample, askable, build, conversation, sample_transformers, swap_key
from zephyr.prompts import encode_chat
from zephyr.registry import Registry
from zephyr.schemas import MCQItem

SYSTEM = "You are a tutor."
OPTIONS = ["oxygen", "carbon dioxide", "helium", "neon"]


def item(i: int, question: str = "What gas do plants take in?", answer: str = "B") -> MCQItem:
    return MCQItem(id=f"q{i}", question=question, options=OPTIONS, answer=answer)


def test_questions_that_point_at_options_or_figures_cannot_be_asked_in_chat():
    items = [item(0), item(1, "Which of the following is a gas?"), item(2, "Which of these is a gas?"),
             item(3, "The diagram shows a plant. What does it take in?"), item(4, "A plant takes in"),
             MCQItem(id="dup", question="What is it?", options=["a", "a", "b", "c"], answer="A")]
    kept, refused, left_out = askable(items)
    assert [i.id for i in kept] == ["q0", "q4"] and refused == 1 and left_out == 3


def test_a_pair_is_a_right_answer_that_ended_against_a_wrong_one_else_one_naming_nothing():
    right = ChatSample("Plants take in carbon dioxide from the air.", ended=True)
    samples = {
        # a wrong answer beats one naming nothing as the rejected reply
        "q0": [right, ChatSample("Plants take in oxygen.", True), ChatSample("Plants are green.", True)],
        # no wrong answer: the one naming no option is rejected (an empty answer is counted, never rejected)
        "q1": [right, ChatSample("", True), ChatSample("Plants are green.", True)],
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
    assert stats.verdicts["right"] == 6 and stats.verdicts["both"] == 1 and stats.answers == 14

    only_wrong, stats = build(items, samples, SYSTEM, rejected="wrong")
    assert [p.meta["question_id"] for p in only_wrong] == ["q0"] and stats.pairs == {"wrong": 1}
    assert [m.role for m in build(items, samples, None)[0][0].prompt] == ["user"]  # system prompt disabled
    with pytest.raises(ValueError, match="rejected must be one of"):
        build(items, samples, SYSTEM, rejected="any")


def test_a_swapped_reply_is_the_chosen_one_naming_a_distractor_instead_of_the_key():
    import random

    options = ["Balance", "Meter stick", "Thermometer", "Graduated cylinder"]
    answer = "Use a balance. A balance compares masses; Balance-scales are old, and balances are not rulers."
    swapped = swap_key(answer, options, 0, random.Random(1))
    # Every mention of the key is swapped, the article and the first letter's case follow; "balances" is another
    # word and stays.
    assert swapped in {
        "Use a meter stick. A meter stick compares masses; Meter stick-scales are old, and balances are not rulers.",
        "Use a thermometer. A thermometer compares masses; Thermometer-scales are old, and balances are not rulers.",
        "Use a graduated cylinder. A graduated cylinder compares masses; Graduated cylinder-scales are old, and "
        "balances are not rulers."}
    assert {swap_key(answer, options, 0, random.Random(seed)) for seed in range(20)} != {swapped}  # random order
    assert swap_key("You need an oven.", ["oven", "electric heater", "DNA"], 0, random.Random(0)) in {
        "You need an electric heater.", "You need a DNA."}  # "an" before a vowel, an acronym keeps its capitals
    # The distractor's own article replaces the mention's; a proper noun mid-sentence keeps its case, a sentence
    # starts with a capital; a number is not named inside another.
    assert swap_key("It sits between the Earth and the Sun.", ["Earth", "The Moon"], 0, random.Random(0)) == \
        "It sits between the Moon and the Sun."
    assert swap_key("Earth is round.", ["Earth", "the Moon"], 0, random.Random(0)) == "The Moon is round."
    assert swap_key("Use an oven.", ["Oven", "A balance"], 0, random.Random(0)) == "Use a balance."
    assert swap_key("It weighs 5 grams.", ["5", "7"], 0, random.Random(0)) == "It weighs 7 grams."
    assert swap_key("It weighs 5.5 grams.", ["5", "7"], 0, random.Random(0)) is None
    # A distractor that holds the key's words would read `both`: the next one is taken, or none.
    assert swap_key("It is carbon.", ["carbon", "carbon dioxide", "neon"], 0, random.Random(0)) == "It is neon."
    assert swap_key("It is carbon.", ["carbon", "carbon dioxide"], 0, random.Random(0)) is None
    assert swap_key("It is something else.", ["carbon", "neon"], 0, random.Random(0)) is None  # never named


def test_wrong_or_swapped_keeps_a_sampled_wrong_answer_and_swaps_only_where_none_is_wrong():
    right = ChatSample("Plants take in carbon dioxide from the air.", ended=True)
    samples = {"q0": [right, ChatSample("Plants take in oxygen.", True), ChatSample("Plants are green.", True)],
               "q1": [right, ChatSample("Plants are green.", True)],
               "q2": [right]}  # no other answer at all: a swap still makes a pair
    items = [item(i) for i in range(3)]
    pairs, stats = build(items, samples, SYSTEM, rejected="wrong-or-swapped")
    by_id = {p.meta["question_id"]: p for p in pairs}
    assert by_id["q0"].meta["rejected"] == "wrong" and by_id["q0"].rejected[0].content == "Plants take in oxygen."
    for question in ("q1", "q2"):
        assert by_id[question].meta["rejected"] == "swapped"
        assert by_id[question].rejected[0].content in {f"Plants take in {gas} from the air." for gas in
                                                       ("oxygen", "helium", "neon")}
    assert stats.pairs == {"wrong": 1, "swapped": 2}
    # Every distractor holds the key's words: no swap reads wrong, so no pair, and the table says why.
    carbon = MCQItem(id="c", question="What is soot?", options=["carbon", "carbon dioxide", "carbon black"],
                     answer="A")
    pairs, stats = build([carbon], {"c": [ChatSample("Soot is carbon.", True)]}, SYSTEM, rejected="wrong-or-swapped")
    assert pairs == [] and stats.unswappable == 1 and stats.verdicts == {"right": 1}


def test_the_older_rules_draw_the_pairs_they_drew_before_the_swap_rule_existed():
    """Seeded draws from fixed samples, as the code before `wrong-or-swapped` drew them: the same sampled answers
    rebuild the same pairs."""
    rights = [ChatSample("Plants take in carbon dioxide.", True), ChatSample("Carbon dioxide, from the air.", True),
              ChatSample("They take in carbon dioxide.", True)]
    samples = {"q0": rights + [ChatSample(t, True) for t in ("Oxygen.", "Helium.", "Plants are green.")],
               "q1": rights + [ChatSample(t, True) for t in ("Plants are green.", "Leaves.")],
               "q2": [ChatSample("Neon.", True), *rights[:2], ChatSample("It is oxygen.", True)],
               "q3": rights}
    items = [item(i) for i in range(4)]
    drawn = {rejected: [(p.meta["question_id"], p.chosen[0].content, p.rejected[0].content)
                        for p in build(items, samples, SYSTEM, rejected=rejected, seed=0)[0]]
             for rejected in ("wrong-or-neither", "wrong")}
    assert drawn == {
        "wrong-or-neither": [("q0", "Carbon dioxide, from the air.", "Helium."),
                             ("q2", "Carbon dioxide, from the air.", "It is oxygen."),
                             ("q1", "Plants take in carbon dioxide.", "Leaves.")],
        "wrong": [("q0", "Carbon dioxide, from the air.", "Helium."),
                  ("q2", "Plants take in carbon dioxide.", "It is oxygen.")]}


def test_answers_written_once_rebuild_pairs_and_a_pairs_file_gives_its_two_replies(tmp_path):
    from zephyr.schemas import write_jsonl

    samples = {"q0": [ChatSample("Plants take in carbon dioxide.", True), ChatSample("Oxygen and", False)],
               "q1": [ChatSample("Neon.", True)]}
    assert chat_answers.write_answers(tmp_path / "answers.jsonl", samples) == 3
    assert chat_answers.read_answers(tmp_path / "answers.jsonl") == samples
    # the lines files already written hold, byte for byte
    assert (tmp_path / "answers.jsonl").read_text().splitlines()[1] == (
        '{"question_id": "q0", "text": "Oxygen and", "ended": false}')
    pairs, _ = build([item(0)], samples | {"q0": samples["q0"] + [ChatSample("Helium.", True)]}, SYSTEM)
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert chat_answers.read_answers(tmp_path / "pairs.jsonl") == {
        "q0": [ChatSample("Plants take in carbon dioxide.", True), ChatSample("Helium.", True)]}
    # A swapped reply was made, not sampled: rebuilding from a swaps file reads its chosen reply alone.
    swaps, _ = build([item(0)], {"q0": [ChatSample("Plants take in carbon dioxide.", True)]}, SYSTEM,
                     rejected="wrong-or-swapped")
    write_jsonl(tmp_path / "swaps.jsonl", swaps)
    assert chat_answers.read_answers(tmp_path / "swaps.jsonl") == {
        "q0": [ChatSample("Plants take in carbon dioxide.", True)]}
    good = '{"question_id": "q0", "text": "x", "ended": true}\n'
    turn = '[{"role": "user", "content": "Which gas?"}]'
    reply = '[{"role": "assistant", "content": "Oxygen."}]'
    for bad, message in (('{"prompt": []}', "prompt: List should have at least 1 item"),
                         ("[1, 2]", "the line: Input should be a valid dictionary"), ("{", "Expecting property name"),
                         ('{"question_id": "q0", "text": null, "ended": true}', "text: Input should be a valid string"),
                         ('{"question_id": "q0", "text": "x", "ended": "false"}',
                          "ended: Input should be a valid boolean"),
                         (f'{{"prompt": {turn}, "chosen": {reply}, "rejected": {reply}, "source": "zephyr-science", '
                          '"meta": {"format": "explain", "question_id": "q0"}}', "a pair from 'zephyr-science' in "
                          "format 'explain'"),
                         (f'{{"prompt": {turn}, "chosen": {reply}, "rejected": {reply}, '
                          '"source": "zephyr-chat-answers", "meta": {"format": "chat", "question_id": 3}}',
                          "meta.question_id must be a string")):
        (tmp_path / "bad.jsonl").write_text(good + bad + "\n")
        with pytest.raises(ValueError, match="bad.jsonl, line 2: neither a sampled answer") as raised:
            chat_answers.read_answers(tmp_path / "bad.jsonl")
        assert message in str(raised.value), bad
    (tmp_path / "bad.jsonl").write_bytes(b"\xff\xfe" + good.encode())
    with pytest.raises(ValueError, match="bad.jsonl is not UTF-8 text"):
        chat_answers.read_answers(tmp_path / "bad.jsonl")


def test_the_cli_refuses_test_and_calibration_splits_and_a_bad_rejected_kind(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.app import app

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    out = tmp_path / "pairs.jsonl"
    for sources, message in (("arc_easy:test", "refusing arc_easy:test"),
                             ("sciq:validation", "refusing sciq:validation")):
        refused = CliRunner().invoke(app, ["data", "chat-answers", "--sources", sources, "--out", str(out)])
        assert refused.exit_code != 0 and message in " ".join(refused.output.split()), sources
    for flags, message in ((["--rejected", "any"], "--rejected must be one of wrong, wrong-or-neither, "
                                                   "wrong-or-swapped"),
                           (["--backend", "onnx"], "--backend must be vllm or transformers"),
                           (["--answers-from", str(tmp_path / "none.jsonl")], "none.jsonl: no such file"),
                           (["--answers-from", str(out), "--answers-out", str(tmp_path / "a.jsonl")],
                            "with --answers-from nothing is sampled"),
                           (["--answers-out", str(out)], "two outputs name one file")):
        refused = CliRunner().invoke(app, ["data", "chat-answers", *flags, "--out", str(out)])
        assert refused.exit_code != 0 and message in " ".join(refused.output.split()), flags
    assert not out.exists()


def test_a_machine_without_the_cleaning_libraries_is_told_before_anything_is_sampled(tmp_path, monkeypatch):
    import sys

    from typer.testing import CliRunner

    from cli.app import app

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))  # no registry: sampling could not start anyway
    monkeypatch.setitem(sys.modules, "datasketch", None)  # an import of it fails, as where it is not installed
    out = tmp_path / "pairs.jsonl"
    refused = CliRunner().invoke(app, ["data", "chat-answers", "--out", str(out)])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "cleaning cannot run here (near duplicates (datasketch)" in said
    assert "--no-clean and run `zephyr data clean`" in said
    # `data clean` has no --no-clean to offer.
    cleaned = CliRunner().invoke(app, ["data", "clean", "--input", str(out), "--out", str(out), "--format", "dpo"])
    said = " ".join(cleaned.output.split())
    assert cleaned.exit_code == 1 and "near duplicates (datasketch)" in said and "--no-clean" not in said
    # Without near-duplicate removal the check passes and the command goes on (to the missing registry model).
    went_on = CliRunner().invoke(app, ["data", "chat-answers", "--near-dup", "0", "--out", str(out)])
    assert "cleaning needs" not in went_on.output and "smollm2-135m-instruct" in went_on.output


def test_transformers_sampling_draws_k_answers_per_question_and_says_which_ran_out_of_tokens(tmp_path,
                                                                                             default_model):
    import torch
    from transformers import AutoModelForCausalLM

    entry = make_tiny_llama(Registry(tmp_path / "models"), default_model)
    # Questions of different lengths share left-padded batches (k * 3 rows, batches of 4).
    items = [item(0), item(1, "Why is the sky blue on a clear day at noon?"), item(2, "Name a gas.")]
    samples = sample_transformers(entry.path, items, SYSTEM, k=3, temperature=1.0, top_p=1.0, max_tokens=6,
                                  batch_size=4, seed=0)
    assert {key: len(found) for key, found in samples.items()} == {"q0": 3, "q1": 3, "q2": 3}
    assert samples == sample_transformers(entry.path, items, SYSTEM, k=3, temperature=1.0, top_p=1.0, max_tokens=6,
                                          batch_size=4, seed=0)  # the seed fixes the draw
    # A random tiny model rarely ends within 6 tokens: an answer that did not end holds all 6 of its tokens.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(entry.path)
    unended = [s for found in samples.values() for s in found if not s.ended]
    assert unended and all(len(tokenizer.encode(s.text, add_special_tokens=False)) >= 4 for s in unended)
    # Greedy through the sampler's left padding equals the model's own unpadded greedy continuation.
    model = AutoModelForCausalLM.from_pretrained(entry.path, dtype=torch.float32).eval()
    prompt = torch.tensor([encode_chat(tokenizer, conversation(items[2].question, SYSTEM))])
    with torch.no_grad():
        alone = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=6)
    greedy = sample_transformers(entry.path, items, SYSTEM, k=1, temperature=1e-4, top_p=1.0, max_tokens=6,
                                 batch_size=3, seed=0)
    assert greedy["q2"][0].text == tokenizer.decode(alone[0, prompt.shape[1]:], skip_special_tokens=True).strip()

    # An answer that ends: make the greedy continuation's third token an end token (as a checkpoint's generation
    # config may name several). The answer holds the two tokens before it, and ended.
    from transformers import GenerationConfig

    continuation = alone[0, prompt.shape[1]:].tolist()
    config = GenerationConfig.from_pretrained(entry.path)
    config.eos_token_id = [tokenizer.eos_token_id, continuation[2]]
    config.save_pretrained(entry.path)
    [ended] = sample_transformers(entry.path, items[2:], SYSTEM, k=1, temperature=1e-4, top_p=1.0, max_tokens=6,
                                  batch_size=1, seed=0)["q2"]
    assert ended.ended and ended.text == tokenizer.decode(continuation[:2], skip_special_tokens=True).strip()


def test_an_output_that_cannot_be_written_or_two_alike_are_refused_before_sampling(tmp_path, monkeypatch):
    """A bad --out failed the write after the sampling (15-40 minutes of vLLM here), and --kto-out naming --out's
    file overwrote the pairs."""
    from typer.testing import CliRunner

    from cli import train as train_cli
    from cli.app import app

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(train_cli, "_sampling_engine", lambda *a, **k: pytest.fail("sampled before the check"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for args, message in ((["data", "restate", "--out", str(blocker / "x.jsonl"), "--no-clean"], "cannot write"),
                          (["data", "science", "--out", str(tmp_path / "p.jsonl"), "--kto-out",
                            str(tmp_path / "p.jsonl")], "two outputs name one file")):
        refused = CliRunner().invoke(app, args)
        said = " ".join(refused.output.split())
        assert refused.exit_code == 1 and message in said and "Traceback" not in said, said


def test_answers_read_from_a_file_need_no_model_in_the_registry(tmp_path, monkeypatch):
    """Rebuilding pairs from answers sampled elsewhere (docs/training.md) looked the default model up in the
    registry, and failed on a machine without it, though nothing is sampled."""
    from typer.testing import CliRunner

    from cli import train as train_cli
    from cli.app import app
    from training.data import cloze
    from zephyr.mcq import LETTERS
    from zephyr.settings import Settings

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))  # an empty registry
    monkeypatch.setattr(train_cli, "_sampling_engine", lambda *a, **k: pytest.fail("sampled"))
    items, _ = cloze.load_items(["arc_easy:train"], Settings().data_dir, 8, exclude_reported=True)
    questions, _, _ = askable(items)
    samples = {q.id: [ChatSample(f"It is {q.options[LETTERS.index(q.answer)]}.", True),
                      ChatSample("I would rather not say.", True)] for q in questions}
    chat_answers.write_answers(tmp_path / "answers.jsonl", samples)
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(app, ["data", "chat-answers", "--sources", "arc_easy:train", "--limit-per-source",
                                      "8", "--answers-from", str(tmp_path / "answers.jsonl"), "--out", str(out),
                                      "--no-clean"], env={"COLUMNS": "200"})
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert "chat-answer pairs from the answers in" in said and "smollm2" not in said  # (the title wraps the path)
    assert len(out.read_text().splitlines()) == len(questions) > 0
