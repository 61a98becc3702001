"""The loop probe: it asks each answer as the text suite does, reads every span's log-likelihood at the right
positions (checked against one forward pass per token), and refuses pairs or models it cannot read."""

from __future__ import annotations

import json
import math

import pytest

from evals import gsm8k
from offline.benchmarks import GSM8KItem
from tests.unit.tiny_llama import make_tiny_llama
from tools.loop_probe import (
    answer_cases,
    end_of_turn_id,
    main,
    mean_logprob,
    next_token_logprobs,
    pair_cases,
    probe,
    read_pairs,
)
from zephyr.prompts import encode_chat
from zephyr.registry import Registry
from zephyr.schemas import TextPreferencePair

ITEMS = [GSM8KItem(id="train/0", question="Tom has 3 apples and buys 2 more. How many apples does he have?",
                   solution="Tom has 3 + 2 = <<3+2=5>>5 apples.\nSo he has 5.", answer="5"),
         GSM8KItem(id="train/1", question="A box holds 4 pens. How many pens are in 2 boxes?",
                   solution="2 boxes hold 2 * 4 = <<2*4=8>>8 pens.", answer="8")]
PAIRS = [TextPreferencePair(prompt="Question: What do plants need to make food?\nAnswer:", chosen=" sunlight",
                            rejected=" darkness", source="test"),
         TextPreferencePair(prompt="Question: Which is a gas at room temperature?\nAnswer:", chosen=" oxygen",
                            rejected=" iron", source="test")]


def test_each_answer_is_asked_as_the_text_suite_asks_it_then_its_first_line_is_copied(tokenizer):
    [case, _] = answer_cases(tokenizer, ITEMS, "You are a tutor.")
    prompt = encode_chat(tokenizer, gsm8k.messages_for(ITEMS[0], "You are a tutor.", []))
    assert case.prefix[: len(prompt)] == prompt
    assert tokenizer.decode(case.prefix[len(prompt):]) == "Tom has 3 + 2 = 5 apples.\nSo he has 5.\nThe answer is 5."
    assert tokenizer.decode(case.copy) == "\nTom has 3 + 2 = 5 apples."


def test_pairs_are_plain_text_and_limited(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(p.model_dump_json() for p in PAIRS) + "\n\n" + PAIRS[0].model_dump_json() + "\n")
    assert read_pairs(path, None) == PAIRS + [PAIRS[0]]
    assert read_pairs(path, 1) == PAIRS[:1]
    chat = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "A"}],
            "rejected": [{"role": "assistant", "content": "B"}]}
    for bad in (json.dumps(chat), "[1]", '{"prompt": ', PAIRS[1].model_copy(update={"rejected": ""}).model_dump_json()):
        path.write_text(PAIRS[0].model_dump_json() + "\n" + bad + "\n")
        with pytest.raises(ValueError, match="pairs.jsonl:2: not a TextPreferencePair"):
            read_pairs(path, None)


def test_a_pair_must_have_a_continuation_to_read_and_the_end_of_turn_is_the_eos(tokenizer):
    assert [len(c.chosen[0]) > c.chosen[1] for c in pair_cases(tokenizer, PAIRS)] == [True, True]
    with pytest.raises(ValueError, match="pair 2: a continuation with no tokens"):
        pair_cases(tokenizer, [PAIRS[0], PAIRS[1].model_copy(update={"rejected": ""})])  # past the schema's check
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model):
    import torch
    from transformers import AutoModelForCausalLM

    entry = make_tiny_llama(Registry(tmp_path_factory.mktemp("home") / "models"), default_model)
    return entry, AutoModelForCausalLM.from_pretrained(entry.path, dtype=torch.float32).eval()


def test_span_likelihoods_are_read_at_the_positions_that_predict_them(tiny, tokenizer):
    import torch

    _, model = tiny
    ids = tokenizer.encode("The sun is a star. The sun is a star.", add_special_tokens=False)
    one_pass = next_token_logprobs(model, ids)
    with torch.inference_mode():  # each token scored from a forward pass over exactly the tokens before it
        separate = [torch.log_softmax(model(torch.tensor([ids[:i]])).logits[0, -1].float(), -1)[ids[i]].item()
                    for i in range(3, 7)]
    assert mean_logprob(one_pass, ids, 3, 7) == pytest.approx(sum(separate) / 4, abs=1e-4)


def test_a_probe_reports_every_figure_per_model(tiny, tokenizer):
    import torch

    entry, model = tiny
    [figures] = probe({"tiny": entry.path}, ITEMS, PAIRS, None)
    assert (figures.model, figures.answers, figures.pairs) == ("tiny", 2, 2)
    with torch.inference_mode():  # the end of turn, scored right after each complete answer
        ends = [torch.log_softmax(model(torch.tensor([c.prefix])).logits[0, -1].float(), -1)[tokenizer.eos_token_id]
                .item() for c in answer_cases(tokenizer, ITEMS, None)]
    assert figures.end_logprob_median == pytest.approx(sum(ends) / 2, abs=1e-4)  # the median of two
    assert figures.end_probability_mean == pytest.approx(sum(math.exp(x) for x in ends) / 2, rel=1e-3)
    assert all(x < 0 for x in (figures.first_repeat_per_token, figures.second_repeat_per_token,
                                figures.chosen_per_token, figures.rejected_per_token))
    [without_pairs] = probe({"tiny": entry.path}, ITEMS, [], None)
    assert without_pairs.pairs == 0 and without_pairs.chosen_per_token is None
    assert without_pairs.first_repeat_per_token == pytest.approx(figures.first_repeat_per_token, abs=1e-5)


@pytest.mark.parametrize(("args", "message"), [
    (["--models", "no-such-model"], "no-such-model"),
    (["--models", "a,a"], "name each registry model once"),
    (["--models", " , "], "name each registry model once"),
    (["--models", "a", "--limit", "0"], "--limit"),
    (["--models", "a", "--out", "no-such-folder/probe.json"], "no-such-folder does not exist"),
])
def test_cli_says_what_to_fix(args, message, refused_tool_output):
    assert message in refused_tool_output(main, args)
