"""Cloze-form pairs (training/data/cloze.py): the builder renders each question exactly as /mcq's `cloze` method scores
it, and the ids the trainers train on are the ids the service scores (checked with the real default tokenizer, on
TRL's own collators and trainers); only training splits, without calibration questions; both recipes train a few
steps on the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.unit.tiny_llama import TINY, make_tiny_llama
from training.data import cloze
from training.data.clean import CleanOptions, ContaminationIndex, clean
from training.recipes import RecipeError, load_recipe
from training.run import _dpo_trainer_class, read_records, train
from zephyr import mcq
from zephyr.registry import Registry
from zephyr.schemas import MCQItem, PreferencePair, TextPreferencePair, TextSFTExample, write_jsonl
from zephyr.settings import Settings

# Options that could merge with the context's last token or split oddly: punctuation, digits, signs, units, a
# leading apostrophe, a passage before the question.
ITEMS = [
    MCQItem(id="t/1", question="Which is a metal?", options=["iron", "wood", "glass", "wool"], answer="A"),
    MCQItem(id="t/2", question="What is 2 - 7?", options=["-5", "5", "-9", "9"], answer="A"),
    MCQItem(id="t/3", question="Water boils at", options=["100°C", "(at sea level) 100 °C", "'s point", "..."],
            answer="B"),
    MCQItem(id="t/4", question="The passage says the moon is", options=["a star", "a satellite", "a planet"],
            answer="B", support="The moon orbits the Earth.\nIt is a natural satellite."),
    MCQItem(id="t/5", question="Pick  the   odd one:", options=[" 3.14 ", "pi\n", "e", ":colon"], answer="D"),
]
SHIPPED = Path("training/recipes")


def served(tokenizer, item: MCQItem) -> list[tuple[list[int], int]]:
    """What /mcq with method cloze sends the engine for this question, one request per option."""
    return mcq.cloze_requests(tokenizer, mcq.MCQuestion.build(item.question, item.options, item.support))


def test_pairs_and_examples_render_the_served_cloze_text():
    pairs, examples, stats = cloze.cloze_records(ITEMS, seed=3, distractors=9)
    assert stats.pairs == sum(len(i.options) - 1 for i in ITEMS) and stats.examples == len(ITEMS)
    by_id = {i.id: i for i in ITEMS}
    for pair in pairs:
        item = by_id[pair.meta["question_id"]]
        q = mcq.MCQuestion.build(item.question, item.options, item.support)
        assert pair.prompt == mcq.cloze_context(q)
        assert pair.chosen == mcq.CLOZE_DELIMITER + q.option_for(item.answer)
        assert pair.rejected == mcq.CLOZE_DELIMITER + q.option_for(pair.meta["rejected_letter"])
        assert pair.meta["rejected_letter"] != item.answer
    assert {(p.meta["question_id"], p.meta["rejected_letter"]) for p in pairs} == \
        {(i.id, letter) for i in ITEMS for letter in mcq.LETTERS[:len(i.options)] if letter != i.answer}
    for example in examples:
        item = by_id[example.meta["question_id"]]
        q = mcq.MCQuestion.build(item.question, item.options, item.support)
        assert (example.prompt, example.completion) == (mcq.cloze_context(q), " " + q.option_for(item.answer))


def test_one_distractor_per_question_by_default_drawn_uniformly():
    items = [ITEMS[0].model_copy(update={"id": f"t/{n}"}) for n in range(300)]
    pairs, _, _ = cloze.cloze_records(items, seed=0)
    assert len(pairs) == 300
    drawn = [p.meta["rejected_letter"] for p in pairs]
    assert {letter: drawn.count(letter) for letter in "BCD"} == pytest.approx({"B": 100, "C": 100, "D": 100}, abs=30)
    assert cloze.cloze_records(items, seed=0)[0] == pairs  # seeded


def test_token_ids_are_the_served_cloze_ids(tokenizer):
    """The pre-tokenized columns are /mcq's cloze requests: same ids, same boundary, no BOS and no EOS."""
    pairs, examples, _ = cloze.cloze_records(ITEMS, distractors=9)
    by_id = {i.id: i for i in ITEMS}
    specials = set(tokenizer.all_special_ids)
    for pair in pairs:
        item = by_id[pair.meta["question_id"]]
        requests = served(tokenizer, item)
        encoded = cloze.tokenize_pair(tokenizer, pair.prompt, pair.chosen, pair.rejected)
        assert encoded is not None
        for reply, letter in (("chosen", item.answer), ("rejected", pair.meta["rejected_letter"])):
            ids, boundary = requests[mcq.LETTERS.index(letter)]
            assert encoded["prompt_ids"] + encoded[f"{reply}_ids"] == ids
            assert len(encoded["prompt_ids"]) == boundary and encoded[f"{reply}_ids"] == ids[boundary:]
        assert not specials & set(encoded["prompt_ids"] + encoded["chosen_ids"] + encoded["rejected_ids"])
    for example in examples:
        item = by_id[example.meta["question_id"]]
        ids, boundary = served(tokenizer, item)[mcq.LETTERS.index(item.answer)]
        encoded = cloze.tokenize_completion(tokenizer, example.prompt, example.completion)
        assert encoded == {"input_ids": ids, "completion_mask": [0] * boundary + [1] * (len(ids) - boundary)}


def test_trls_preference_collator_feeds_the_served_ids(tokenizer):
    """What TRL's DPO collator builds from the columns: the served ids, the loss mask on the continuation only."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    pairs, _, _ = cloze.cloze_records(ITEMS)
    rows, dropped = cloze.tokenize_rows([p.model_dump() for p in pairs], tokenizer, "dpo")
    assert dropped == 0
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(rows)
    n = len(rows)
    for i, pair in enumerate(pairs):
        item = next(it for it in ITEMS if it.id == pair.meta["question_id"])
        requests = served(tokenizer, item)
        for half, letter in ((i, item.answer), (n + i, pair.meta["rejected_letter"])):
            ids, boundary = requests[mcq.LETTERS.index(letter)]
            length = int(batch["attention_mask"][half].sum())
            assert batch["input_ids"][half][:length].tolist() == ids  # right-padded, nothing appended
            assert batch["completion_mask"][half][:length].tolist() == [0] * boundary + [1] * (len(ids) - boundary)


def test_trls_default_tokenization_would_append_eos(tokenizer):
    """Why the runner tokenizes: TRL 1.16 appends the EOS text to every plain-text reply, a term /mcq's cloze score
    does not have (on the default tokenizer that is the only difference)."""
    pair = cloze.cloze_records(ITEMS[:1])[0][0]
    trl_ids = tokenizer(text=pair.prompt + pair.chosen + tokenizer.eos_token)["input_ids"]
    ours = cloze.tokenize_pair(tokenizer, pair.prompt, pair.chosen, pair.rejected)
    assert trl_ids == ours["prompt_ids"] + ours["chosen_ids"] + [tokenizer.eos_token_id]


def test_every_default_training_question_tokenizes_without_a_boundary_merge(tokenizer):
    data_dir = Settings().data_dir
    if not (data_dir / "arc").is_dir():  # the shared data is optional on a developer machine; a loader's bug is not
        pytest.skip(f"training splits not available in {data_dir}")
    items, _ = cloze.load_items(list(cloze.DEFAULT_SOURCES), data_dir)
    pairs, examples, _ = cloze.cloze_records(items)
    rows, dropped = cloze.tokenize_rows([p.model_dump() for p in pairs], tokenizer, "dpo")
    assert dropped == 0 and len(rows) > 7000
    for pair, row in zip(pairs, rows, strict=True):
        assert row["prompt_ids"] == tokenizer.encode(pair.prompt, add_special_tokens=False)


def _tiny_trainer(method: str, tokenizer, default_model, tmp_path: Path, rows: list[dict]):
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    tiny = make_tiny_llama(Registry(tmp_path / "models"), default_model)
    model = AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32)
    common = {"output_dir": str(tmp_path / "out"), "use_cpu": True, "max_length": 64, "report_to": "none",
              "per_device_train_batch_size": len(rows), "bf16": False}
    if method == "dpo":
        return _dpo_trainer_class()(model=model, args=trl.DPOConfig(**common), train_dataset=Dataset.from_list(rows),
                                    processing_class=tokenizer)
    return trl.SFTTrainer(model=model, args=trl.SFTConfig(**common, completion_only_loss=True),
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def _unpadded(batch: dict, key: str) -> list[list[int]]:
    return [row[: int(mask.sum())].tolist() for row, mask in zip(batch[key], batch["attention_mask"], strict=True)]


def test_trainers_train_on_the_served_ids(tokenizer, default_model, tmp_path):
    """TRL's DPOTrainer (the runner's subclass) and SFTTrainer, given the id columns, batch them as they are: no EOS,
    no re-tokenization; SFT's labels are the key's continuation only."""
    pairs, examples, _ = cloze.cloze_records(ITEMS)
    rows, _ = cloze.tokenize_rows([p.model_dump() for p in pairs], tokenizer, "dpo")
    trainer = _tiny_trainer("dpo", tokenizer, default_model, tmp_path / "dpo", rows)
    assert [dict(r) for r in trainer.train_dataset] == rows
    batch = next(iter(trainer.get_train_dataloader()))
    expected = []
    for pair in pairs:
        item = next(it for it in ITEMS if it.id == pair.meta["question_id"])
        expected += [served(tokenizer, item)[mcq.LETTERS.index(letter)][0]
                     for letter in (item.answer, pair.meta["rejected_letter"])]
    assert sorted(_unpadded(batch, "input_ids")) == sorted(expected)
    _assert_sft_batch_is_served_ids(tokenizer, default_model, tmp_path, examples, end_with_eos=False)


def test_sft_ending_with_eos_trains_the_end_token_after_the_served_ids(tokenizer, default_model, tmp_path):
    """data.end_with_eos: the served ids, then the tokenizer's EOS, and the loss reaches the EOS (TRL pads the labels
    by length, so an EOS that is also the pad token is still learned)."""
    assert tokenizer.eos_token_id == tokenizer.pad_token_id  # the case where a collator could mistake it for padding
    _, examples, _ = cloze.cloze_records(ITEMS)
    _assert_sft_batch_is_served_ids(tokenizer, default_model, tmp_path, examples, end_with_eos=True)


def _assert_sft_batch_is_served_ids(tokenizer, default_model, tmp_path: Path, examples, end_with_eos: bool) -> None:
    """SFTTrainer's first batch: each example's served ids (then EOS), labels on the key's continuation only."""
    rows, dropped = cloze.tokenize_rows([e.model_dump() for e in examples], tokenizer, "sft", end_with_eos)
    assert dropped == 0
    trainer = _tiny_trainer("sft", tokenizer, default_model, tmp_path / "sft", rows)
    batch = next(iter(trainer.get_train_dataloader()))
    expected = []
    for example in examples:
        item = next(it for it in ITEMS if it.id == example.meta["question_id"])
        ids, boundary = served(tokenizer, item)[mcq.LETTERS.index(item.answer)]
        whole = [*ids, tokenizer.eos_token_id] if end_with_eos else ids
        expected.append((whole, [-100] * boundary + whole[boundary:]))
    assert sorted(zip(_unpadded(batch, "input_ids"), _unpadded(batch, "labels"), strict=True)) == sorted(expected)


def test_end_with_eos_is_for_sft_only(tmp_path):
    data = tmp_path / "cloze.jsonl"  # the shipped recipes name data a fresh clone has not built
    data.write_text("")
    assert load_recipe(SHIPPED / "sft-cloze-eos.yaml", [f"data.train={data}"]).data.end_with_eos
    with pytest.raises(RecipeError, match="end_with_eos ends SFT completions, not dpo"):
        load_recipe(SHIPPED / "dpo-cloze.yaml", [f"data.train={data}", "data.end_with_eos=true"])


def _obqa(path: Path, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key"]
    lines += [f"q{i}\tWhich item {i} conducts heat well?\t(A) copper {i} (B) wood {i} (C) felt {i} (D) foam {i}\tx\tA"
              for i in range(count)]
    path.write_text("\n".join(lines) + "\n")


def test_training_splits_only_and_calibration_questions_left_out(tmp_path):
    from offline.benchmarks import CALIBRATION_LIMITS, SourceError

    _obqa(tmp_path / "openbookqa" / "train.tsv", CALIBRATION_LIMITS["openbookqa"] + 7)
    items, reserved = cloze.load_items(["openbookqa:train"], tmp_path)
    assert reserved == {"openbookqa:train": CALIBRATION_LIMITS["openbookqa"]}
    assert [i.id for i in items] == [f"openbookqa:train/q{n}" for n in range(500, 507)]  # calibration reads q0-q499
    # a later copy of a head question (the same stem and options under another id, as OpenBookQA train holds 8)
    path = tmp_path / "openbookqa" / "train.tsv"
    path.write_text(path.read_text() + "late\tWhich item 3 conducts heat well?\t(A) wood 3 (B) copper 3 (C) felt 3 "
                                       "(D) foam 3\tx\tB\n")
    items, reserved = cloze.load_items(["openbookqa:train"], tmp_path)
    assert reserved == {"openbookqa:train": CALIBRATION_LIMITS["openbookqa"] + 1}
    assert "openbookqa:train/late" not in [i.id for i in items]
    for source in ("sciq:validation", "mmlu:validation", "arc_easy:test", "openbookqa:validation"):
        with pytest.raises(SourceError, match="refusing"):
            cloze.load_items([source], tmp_path)
    # refused before a source that would be read first (and take its time) is read: arc_easy:train is not there
    with pytest.raises(SourceError, match="refusing sciq:validation"):
        cloze.load_items(["arc_easy:train", "sciq:validation"], tmp_path)


def test_plain_text_pairs_are_decontaminated_and_deduplicated():
    pairs, examples, _ = cloze.cloze_records(ITEMS + [ITEMS[0].model_copy(update={"id": "t/dup"})])
    index = ContaminationIndex.from_texts({"arc_easy": ["The passage says the moon is"]}, ngram=13)
    options = CleanOptions(redact_pii=False, near_dup_threshold=None)
    for records in (pairs, examples):
        kept, report = clean(records, options, index=index)
        assert report.contaminated == {"arc_easy": 1}  # the question with the passage holds the test question
        assert "t/4" not in {r.meta["question_id"] for r in kept}
    kept, report = clean(examples, options, index=index)  # the same question twice: the same SFT example
    assert report.exact_duplicates == 1 and len({r.meta["question_id"] for r in kept} & {"t/1", "t/dup"}) == 1


def test_runner_reads_plain_text_for_dpo_and_sft_only(tmp_path):
    pairs, examples, _ = cloze.cloze_records(ITEMS)
    text_pairs, text_sft = tmp_path / "pairs.jsonl", tmp_path / "sft.jsonl"
    write_jsonl(text_pairs, pairs)
    write_jsonl(text_sft, examples)
    assert read_records([text_pairs], "dpo")[0].keys() == {"prompt", "chosen", "rejected"}
    assert read_records([text_sft], "sft")[0].keys() == {"prompt", "completion"}
    with pytest.raises(RecipeError, match="not a KTOExample"):
        read_records([text_pairs], "kto")
    chat = tmp_path / "chat.jsonl"
    write_jsonl(chat, [PreferencePair(prompt=[{"role": "user", "content": "Q"}],
                                      chosen=[{"role": "assistant", "content": "A"}],
                                      rejected=[{"role": "assistant", "content": "B"}], source="t")])
    with pytest.raises(RecipeError, match="mix plain-text and conversational"):
        read_records([text_pairs, chat], "dpo")
    latin1 = tmp_path / "latin1.jsonl"  # dpo and sft raised UnicodeDecodeError where kto named the line
    latin1.write_bytes('{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    for method in ("dpo", "sft", "kto"):
        with pytest.raises(RecipeError, match=r"latin1\.jsonl"):
            read_records([latin1], method)


def test_cli_writes_pairs_and_sft_examples(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.app import app

    _obqa(tmp_path / "data" / "openbookqa" / "train.tsv", 512)
    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZEPHYR_DATA_DIR", str(tmp_path / "data"))
    out, sft = tmp_path / "pairs.jsonl", tmp_path / "sft.jsonl"
    result = CliRunner().invoke(app, ["data", "cloze", "--sources", "openbookqa:train", "--out", str(out),
                                      "--sft-out", str(sft), "--no-decontaminate"])
    assert result.exit_code == 0, result.output
    rows = [TextPreferencePair.model_validate_json(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and all(r.prompt.startswith("Question: Which item") and r.chosen.startswith(" copper")
                                   for r in rows)
    assert len([TextSFTExample.model_validate_json(line) for line in sft.read_text().splitlines()]) == 12
    # What `data cloze --no-clean` advises: clean the files later (`data clean` read only the chat schemas).
    for fmt, path in (("cloze-dpo", out), ("cloze-sft", sft)):
        cleaned = CliRunner().invoke(app, ["data", "clean", "--input", str(path), "--out", str(tmp_path / fmt),
                                           "--format", fmt, "--no-decontaminate"])
        assert cleaned.exit_code == 0, cleaned.output
        assert len((tmp_path / fmt).read_text().splitlines()) == 12
    # A folder as --out or --input is refused before any work (it raised IsADirectoryError after the cleaning).
    folder = CliRunner().invoke(app, ["data", "clean", "--input", str(out), "--out", str(tmp_path), "--format", "dpo"])
    assert folder.exit_code == 2 and "--out" in folder.output and "directory" in folder.output  # click's own check
    folder = CliRunner().invoke(app, ["data", "clean", "--input", str(tmp_path), "--out", str(out), "--format", "dpo"])
    assert folder.exit_code == 1 and "is a folder; give a JSON Lines file" in " ".join(folder.output.split())
    refused = CliRunner().invoke(app, ["data", "cloze", "--sources", "sciq:validation", "--out", str(out)])
    assert refused.exit_code != 0 and "refusing sciq:validation" in " ".join(refused.output.split())


@pytest.fixture(scope="module")
def home(tmp_path_factory, default_model) -> Path:
    home = tmp_path_factory.mktemp("cloze-home")
    make_tiny_llama(Registry(home / "models"), default_model)
    return home


def test_end_with_eos_on_chat_examples_is_refused_before_training(home, tmp_path):
    from training.run import TrainingError
    from zephyr.schemas import Message, SFTExample

    data = tmp_path / "chat.jsonl"
    turns = [Message(role="user", content="Q"), Message(role="assistant", content="A")]
    write_jsonl(data, [SFTExample(messages=turns)])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"method": "sft", "model": TINY, "output": "tiny-chat-eos",
                                    "data": {"train": str(data), "end_with_eos": True}}))
    with pytest.raises(TrainingError, match="chat examples already end each turn"):
        train(load_recipe(path), Settings(home=home), recipe_path=path)
    assert not (home / "runs" / "tiny-chat-eos").exists()
    # Plain-text training with a chat eval file: one tokenization serves both, so it failed after the model loaded.
    _, examples, _ = cloze.cloze_records(ITEMS)
    text = tmp_path / "text.jsonl"
    write_jsonl(text, examples)
    path.write_text(yaml.safe_dump({"method": "sft", "model": TINY, "output": "tiny-mixed",
                                    "data": {"train": str(text), "eval": [str(data)]}}))
    with pytest.raises(RecipeError, match="mix plain-text and conversational records across data.train and data.eval"):
        train(load_recipe(path), Settings(home=home), recipe_path=path)
    assert not (home / "runs" / "tiny-mixed").exists()


@pytest.mark.parametrize("recipe,schema", [("dpo-cloze.yaml", "pairs"), ("sft-cloze.yaml", "sft"),
                                           ("sft-cloze-eos.yaml", "sft")])
def test_shipped_cloze_recipe_trains_a_few_steps_on_the_tiny_model(recipe, schema, home, tmp_path):
    pairs, examples, _ = cloze.cloze_records([i.model_copy(update={"id": f"{i.id}-{n}"}) for n in range(4)
                                              for i in ITEMS])
    data = tmp_path / f"{schema}.jsonl"
    write_jsonl(data, pairs if schema == "pairs" else examples)
    body = yaml.safe_load((SHIPPED / recipe).read_text())
    assert body["trainer"]["gradient_checkpointing"] is False and body["trainer"]["bf16"] is False
    path = tmp_path / recipe
    path.write_text(yaml.safe_dump(body))
    overrides = [f"model={TINY}", f"output=tiny-{recipe.removesuffix('.yaml')}", f"data.train={data}",
                 "data.limit=null", "data.eval_fraction=0.2", "trainer.max_steps=2", "trainer.eval_steps=1",
                 "trainer.save_steps=2", "trainer.logging_steps=1", "lora.r=4", "lora.alpha=8"]
    result = train(load_recipe(path, overrides), Settings(home=home), recipe_path=path)
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {row["step"] for row in logged if "loss" in row} == {1, 2}
    if schema == "pairs":
        assert any("eval_rewards/margins" in row for row in logged)
    assert Registry(Settings(home=home).models_dir).get(f"tiny-{recipe.removesuffix('.yaml')}").manifest.parent == TINY


def test_records_sharing_a_question_are_counted_for_the_by_record_split_warning(tmp_path):
    from training.run import records_sharing_a_question

    pairs, _, _ = cloze.cloze_records(ITEMS)
    once, twice = tmp_path / "once.jsonl", tmp_path / "twice.jsonl"
    write_jsonl(once, pairs)
    write_jsonl(twice, pairs + pairs[:2])  # two questions with a second pair each (--distractors 2 makes such)
    assert records_sharing_a_question([once]) == 0
    assert records_sharing_a_question([twice]) == 2
    assert records_sharing_a_question([once, twice]) == len(pairs) + 2  # across files too
    assert records_sharing_a_question([twice], limit=len(pairs)) == 0  # only what data.limit reads
    # One stem under another question id (two benchmark questions worded alike): the same cloze context
    reworded = tmp_path / "reworded.jsonl"
    twin = pairs[0].model_copy(update={"meta": {**pairs[0].meta, "question_id": "another-id"}})
    write_jsonl(reworded, pairs + [twin])
    assert records_sharing_a_question([reworded]) == 1
