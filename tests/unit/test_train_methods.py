"""Every training method runs a few real TRL steps on a tiny Llama and ends as a registry entry with its manifest,
run folder, metrics and curves; resuming and refusing are checked on the same small runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.unit.tiny_llama import TINY, make_tiny_llama
from training.recipes import RecipeError, load_recipe
from training.rs import CUT_OFF, _reusable_stats, best_of_n, read_prompts_and_stamps
from training.run import TrainingError, balance_lengths, hold_out, opening, register_run, train
from zephyr.registry import ModelManifest, Registry, RegistryError, check_hf_folder
from zephyr.schemas import KTOExample, Message, PreferencePair, SFTExample, read_jsonl, write_jsonl
from zephyr.settings import Settings

STEPS = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64, "logging_steps": 1,
         "save_steps": 1, "learning_rate": 1.0e-3}


def user(text: str) -> list[Message]:
    return [Message(role="user", content=text)]


def reply(text: str) -> list[Message]:
    return [Message(role="assistant", content=text)]


def write_data(folder: Path) -> dict[str, Path]:
    questions = [f"Why is the sky blue on day {i}?" for i in range(8)]
    files = {"dpo": folder / "pairs.jsonl", "kto": folder / "kto.jsonl", "sft": folder / "sft.jsonl"}
    write_jsonl(files["dpo"], [PreferencePair(prompt=user(q), chosen=reply("Air scatters blue light most."),
                                              rejected=reply("Because it is."), source="test") for q in questions])
    write_jsonl(files["kto"], [KTOExample(prompt=user(q), completion=reply("Air scatters blue light." if i % 2 else
                                                                          "No idea."), label=bool(i % 2))
                               for i, q in enumerate(questions)])
    write_jsonl(files["sft"], [SFTExample(messages=user(q) + reply("Air scatters blue light most."))
                               for q in questions])
    return files


@pytest.fixture(scope="module")
def home(tmp_path_factory, default_model) -> Path:
    home = tmp_path_factory.mktemp("train-home")
    make_tiny_llama(Registry(home / "models"), default_model)
    return home


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_data(tmp_path_factory.mktemp("train-data"))


def recipe_file(folder: Path, name: str, body: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("method,data_key,extra", [
    ("sft", "sft", {}),
    ("dpo", "dpo", {"beta": 0.1}),
    ("kto", "kto", {"beta": 0.1}),
    ("rm", "dpo", {}),
])
def test_method_trains_and_registers(method, data_key, extra, home, data, tmp_path):
    settings = Settings(home=home)
    path = recipe_file(tmp_path, f"tiny-{method}", {
        "method": method, "model": TINY, "output": f"tiny-{method}",
        "data": {"train": str(data[data_key]), "eval_fraction": 0.25},
        "lora": {"r": 4, "alpha": 8}, "trainer": {**STEPS, **extra}})
    result = train(load_recipe(path), settings, recipe_path=path)

    entry = Registry(settings.models_dir).get(f"tiny-{method}")
    check_hf_folder(entry.path)  # config, tokenizer with its chat template, safetensors
    assert entry.manifest.parent == TINY and entry.manifest.method == method
    assert entry.manifest.recipe["trainer"]["max_steps"] == 2 and len(entry.manifest.recipe_digest) == 64
    assert entry.manifest.data_digest and len(entry.manifest.data_digest) == 64
    config = json.loads((entry.path / "config.json").read_text())
    assert config["dtype"] == "bfloat16"  # the parent's dtype, not the fp32 it trained in
    assert "lora" not in json.dumps(config).lower()  # merged: no adapter left for vLLM to trip on
    assert not list(entry.path.glob("adapter_*"))
    if method == "rm":
        assert config["architectures"] == ["LlamaForSequenceClassification"]
        assert "eval_accuracy" in result.metrics  # TRL's batch-averaged agreement with the held-out preferences
        recorded = entry.manifest.evals["heldout_agreement"]  # pooled over every held-out pair, for the report
        assert recorded["n"] == 2 and recorded["agreement"] == result.metrics["heldout_agreement"]
        assert recorded["longer_answer"] == 1.0  # every chosen reply of the test pairs is the longer one
        assert recorded["ci95"][0] <= recorded["agreement"] <= recorded["ci95"][1]
    run = result.run_dir
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {row["step"] for row in logged if "loss" in row} == {1, 2}
    assert [row["step"] for row in logged if "eval_loss" in row] == [2]  # evaluated once at the end, not twice
    assert result.metrics["eval_loss"] == next(row["eval_loss"] for row in logged if "eval_loss" in row)
    if method == "dpo":
        assert any("rewards/margins" in row for row in logged) and any("eval_rewards/margins" in row for row in logged)
    assert (run / "curves.png").stat().st_size > 1000
    assert json.loads((run / "recipe.json").read_text())["recipe"]["method"] == method
    assert json.loads((run / "summary.json").read_text())["train_records"] == 6  # 8 minus the 25% held out
    # hand-written records: counted as carrying no cleaning stamp, in the manifest as in the run's summary
    assert entry.manifest.stats["data_cleaning"] == {"cleaned": 0, "cleaned_partly": 0, "never_cleaned": 0,
                                                      "unstamped": 8}
    assert json.loads((run / "summary.json").read_text())["data_cleaning"]["unstamped"] == 8


def test_records_the_trainer_drops_at_max_length_are_counted_and_an_emptied_part_is_refused(home, tmp_path):
    """TRL's DPO leaves out a pair whose prompt fills max_length without a word: the summary counts it, and a run
    left with none says why instead of torch's num_samples=0 traceback."""
    settings = Settings(home=home)
    long_question = "Why is the sky blue? " + "Tell me more about the air, please. " * 20
    pairs = tmp_path / "pairs.jsonl"

    def write(questions: list[str]) -> None:
        write_jsonl(pairs, [PreferencePair(prompt=user(q), chosen=reply("Air scatters blue light most."),
                                           rejected=reply("Because it is."), source="test") for q in questions])

    write([f"Why is the sky blue on day {i}?" for i in range(6)] + [long_question + str(i) for i in range(2)])
    body = {"method": "dpo", "model": TINY, "output": "tiny-dropped", "data": {"train": str(pairs)},
            "lora": {"r": 4, "alpha": 8}, "trainer": {**STEPS, "max_steps": 1}}
    path = recipe_file(tmp_path, "dropped", body)
    result = train(load_recipe(path), settings, recipe_path=path)
    assert result.metrics["train_records_dropped_at_max_length"] == 2
    assert json.loads((result.run_dir / "summary.json").read_text())["metrics"][
        "train_records_dropped_at_max_length"] == 2

    write([long_question + str(i) for i in range(4)])
    path = recipe_file(tmp_path, "emptied", {**body, "output": "tiny-emptied"})
    with pytest.raises(TrainingError, match="every train record is longer than trainer.max_length 64"):
        train(load_recipe(path), settings, recipe_path=path)


def test_validation_is_carved_from_training_and_the_reward_model_is_scored_on_both_parts(home, data, tmp_path):
    settings = Settings(home=home)
    path = recipe_file(tmp_path, "tiny-rm-val", {
        "method": "rm", "model": TINY, "output": "tiny-rm-val",
        "data": {"train": str(data["dpo"]), "eval_fraction": 0.25, "validation_fraction": 0.4},
        "lora": {"r": 4, "alpha": 8}, "trainer": STEPS})
    result = train(load_recipe(path), settings, recipe_path=path)

    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert (summary["train_records"], summary["validation_records"], summary["eval_records"]) == (3, 3, 2)
    evals = Registry(settings.models_dir).get("tiny-rm-val").manifest.evals
    assert evals["validation_agreement"]["n"] == 3 and evals["heldout_agreement"]["n"] == 2
    assert result.metrics["validation_agreement"] == evals["validation_agreement"]["agreement"]
    for part, n in (("validation", 3), ("heldout", 2)):  # each pair's outcome, for paired comparisons of variants
        outcomes = [json.loads(line) for line in (result.run_dir / f"{part}-agreement.jsonl").read_text().splitlines()]
        assert len(outcomes) == n == len({o["pair"] for o in outcomes})
        assert sum(o["agrees"] for o in outcomes) / n == evals[f"{part}_agreement"]["agreement"]
        assert all(o["chosen_chars"] > o["rejected_chars"] for o in outcomes)  # every chosen reply here is longer
    assert "eval_loss" in result.metrics  # the trainer watched validation while it ran
    assert not any(key.startswith("heldout_loss") for key in result.metrics)  # scored pooled, above

    # Every chosen reply here is the longer: balancing the training part would leave nothing, and says so early.
    balanced = recipe_file(tmp_path, "tiny-rm-balanced", {
        "method": "rm", "model": TINY, "output": "tiny-rm-balanced",
        "data": {"train": str(data["dpo"]), "eval_fraction": 0.25, "validation_fraction": 0.4,
                 "balance_lengths": True}, "lora": {"r": 4, "alpha": 8}, "trainer": STEPS})
    with pytest.raises(RecipeError, match="balancing leaves none"):
        train(load_recipe(balanced), settings, recipe_path=balanced)
    assert not Registry(settings.models_dir).exists("tiny-rm-balanced")


def test_with_validation_a_dpo_run_scores_its_held_out_pairs_once_at_the_end(home, data, tmp_path):
    settings = Settings(home=home)
    path = recipe_file(tmp_path, "tiny-dpo-val", {
        "method": "dpo", "model": TINY, "output": "tiny-dpo-val",
        "data": {"train": str(data["dpo"]), "eval_fraction": 0.25, "validation_fraction": 0.4},
        "lora": {"r": 4, "alpha": 8}, "trainer": {**STEPS, "beta": 0.1}})
    result = train(load_recipe(path), settings, recipe_path=path)

    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert (summary["train_records"], summary["validation_records"], summary["eval_records"]) == (3, 3, 2)
    for part in ("eval", "heldout"):  # validation while it ran, the held-out pairs once after
        assert f"{part}_loss" in summary["metrics"] and f"{part}_rewards/accuracies" in summary["metrics"]
    metrics = summary["metrics"]
    assert metrics["heldout_loss"] != metrics["eval_loss"]  # two different sets of pairs
    # TRL names its own metrics eval_* in every evaluation: validation's must not be overwritten by held-out ones
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    (validation,) = [row for row in logged if "eval_loss" in row]
    assert metrics["eval_rewards/margins"] == validation["eval_rewards/margins"]
    assert not any(key.startswith("heldout") for row in logged for key in row)  # sweeps read validation only


def test_dpo_merged_weights_differ_from_parent(home, data, tmp_path):
    import torch
    from safetensors.torch import load_file

    settings = Settings(home=home)
    path = recipe_file(tmp_path, "moved", {"method": "dpo", "model": TINY, "output": "tiny-moved",
                                           "data": {"train": str(data["dpo"])}, "lora": {"r": 4, "alpha": 8},
                                           "trainer": {**STEPS, "max_steps": 3}})
    train(load_recipe(path), settings, recipe_path=path)
    registry = Registry(settings.models_dir)
    before = load_file(next(registry.get(TINY).path.glob("*.safetensors")))
    after = load_file(next(registry.get("tiny-moved").path.glob("*.safetensors")))
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("q_proj" in k for k in changed)  # the LoRA update landed in the merged weights


def test_a_run_folder_trained_elsewhere_registers_as_training_would_have_and_refuses_what_differs(
        home, data, tmp_path, default_model):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    pairs = tmp_path / "pairs.jsonl"
    shutil.copy(data["dpo"], pairs)
    body = {"method": "dpo", "model": TINY, "output": "tiny-elsewhere", "data": {"train": str(pairs)},
            "lora": {"r": 4, "alpha": 8}, "trainer": {**STEPS, "max_steps": 2}}
    path = recipe_file(tmp_path, "elsewhere", body)
    trained = train(load_recipe(path), Settings(home=home), recipe_path=path)
    # Another machine: its own registry with the same base, and the run folder copied into its runs/.
    here = Settings(home=tmp_path / "here")
    make_tiny_llama(Registry(here.models_dir), default_model)
    with pytest.raises(TrainingError, match="holds no finished run"):
        register_run(load_recipe(path), here, recipe_path=path)
    shutil.copytree(trained.run_dir, here.home / "runs" / "tiny-elsewhere")
    other = recipe_file(tmp_path, "other", {**body, "trainer": {**STEPS, "max_steps": 3}})
    with pytest.raises(TrainingError, match="trained by another recipe"):
        register_run(load_recipe(other), here, recipe_path=other)
    original = pairs.read_text()
    pairs.write_text(original.replace("Because it is.", "Because."))
    with pytest.raises(TrainingError, match="trained on other data"):
        register_run(load_recipe(path), here, recipe_path=path)
    pairs.write_text(original)
    # The same name, other weights: an adapter merged onto them would be another model.
    weights = next(Registry(here.models_dir).get(TINY).path.glob("*.safetensors"))
    kept = load_file(weights)
    save_file({k: v + 1 if k.endswith("q_proj.weight") else v for k, v in kept.items()}, weights,
              metadata={"format": "pt"})
    with pytest.raises(TrainingError, match="adapts other weights than 'tiny-llama'"):
        register_run(load_recipe(path), here, recipe_path=path)
    save_file(kept, weights, metadata={"format": "pt"})

    result = register_run(load_recipe(path), here, recipe_path=path)
    assert result.entry.manifest.parent == TINY and result.entry.manifest.recipe_digest == \
        trained.entry.manifest.recipe_digest and result.entry.manifest.data_digest == trained.entry.manifest.data_digest
    assert result.metrics == json.loads(json.dumps(trained.metrics))  # the run's own figures, from summary.json
    there = load_file(next(trained.entry.path.glob("*.safetensors")))
    registered = load_file(next(result.entry.path.glob("*.safetensors")))
    assert there.keys() == registered.keys() and all(torch.equal(there[k], registered[k]) for k in there)
    with pytest.raises(RegistryError, match="already exists"):
        register_run(load_recipe(path), here, recipe_path=path)


def test_rm_on_its_top_layer_with_length_grouped_batches_leaves_lower_layers_alone(home, data, tmp_path):
    import torch
    from safetensors.torch import load_file

    settings = Settings(home=home)
    path = recipe_file(tmp_path, "top", {"method": "rm", "model": TINY, "output": "tiny-rm-top",
                                         "data": {"train": str(data["dpo"]), "eval_fraction": 0.25},
                                         "lora": {"r": 4, "alpha": 8, "top_layers": 1},
                                         "trainer": {**STEPS, "train_sampling_strategy": "group_by_length"}})
    result = train(load_recipe(path), settings, recipe_path=path)
    assert "eval_accuracy" in result.metrics
    registry = Registry(settings.models_dir)
    before = load_file(next(registry.get(TINY).path.glob("*.safetensors")))
    after = load_file(next(registry.get("tiny-rm-top").path.glob("*.safetensors")))
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.layers.1.") for k in changed)  # the tiny Llama has layers 0 and 1
    assert not any(k.startswith("model.layers.0.") for k in changed)

    too_many = recipe_file(tmp_path, "too-many", {"method": "rm", "model": TINY, "output": "tiny-rm-3",
                                                  "data": {"train": str(data["dpo"])},
                                                  "lora": {"r": 4, "top_layers": 3}, "trainer": STEPS})
    with pytest.raises(RecipeError, match="lora.top_layers is 3 but .* has 2 layers"):
        train(load_recipe(too_many), settings, recipe_path=too_many)
    misnamed = recipe_file(tmp_path, "misnamed", {"method": "rm", "model": TINY, "output": "tiny-rm-4",
                                                  "data": {"train": str(data["dpo"])},
                                                  "lora": {"r": 4, "target_modules": ["qproj"]}, "trainer": STEPS})
    with pytest.raises(RecipeError, match="has no module named 'qproj'; its linear layers are .*q_proj"):
        train(load_recipe(misnamed), settings, recipe_path=misnamed)
    from training.run import _peft_config

    dotted = load_recipe(recipe_file(tmp_path, "dotted", {
        "method": "rm", "model": TINY, "output": "tiny-rm-6", "data": {"train": str(data["dpo"])},
        "lora": {"r": 4, "target_modules": ["self_attn.q_proj", "down_proj"]}, "trainer": STEPS}))
    from transformers import AutoModelForCausalLM

    tiny = AutoModelForCausalLM.from_pretrained(Registry(settings.models_dir).get(TINY).path)
    assert set(_peft_config(dotted, tiny).target_modules) == {"self_attn.q_proj", "down_proj"}  # PEFT's suffix match
    one_conversation = tmp_path / "one-conversation.jsonl"  # four pairs that open alike: one group
    write_jsonl(one_conversation, [PreferencePair(prompt=user("Why is the sky blue?"), chosen=reply(f"Light {i}."),
                                                  rejected=reply("No."), source="test") for i in range(4)])
    emptied = recipe_file(tmp_path, "emptied", {"method": "rm", "model": TINY, "output": "tiny-rm-5",
                                                "data": {"train": str(one_conversation), "eval_fraction": 0.1,
                                                         "eval_group": "opening"},
                                                "lora": {"r": 4}, "trainer": STEPS})
    with pytest.raises(TrainingError, match="the training part of .* records is empty"):
        train(load_recipe(emptied), settings, recipe_path=emptied)
    # By record, two records cannot give one to held out and one to validation (datasets raised its own ValueError).
    two = recipe_file(tmp_path, "two", {"method": "rm", "model": TINY, "output": "tiny-rm-7",
                                        "data": {"train": str(one_conversation), "limit": 2, "eval_fraction": 0.05,
                                                 "validation_fraction": 0.05},
                                        "lora": {"r": 4}, "trainer": STEPS})
    with pytest.raises(TrainingError, match="the training part of 2 records is empty"):
        train(load_recipe(two), settings, recipe_path=two)
    # A reward model is no base for a chat model: loaded as a causal LM it would lose its score head unnoticed.
    Registry(settings.models_dir).add(Registry(settings.models_dir).get(TINY).path,
                                      ModelManifest(name="tiny-scorer", parent=TINY, method="rm"))
    on_rm = recipe_file(tmp_path, "on-rm", {"method": "sft", "model": "tiny-scorer", "output": "tiny-sft-on-rm",
                                            "data": {"train": str(data["sft"])}, "lora": {"r": 4}, "trainer": STEPS})
    with pytest.raises(TrainingError, match="model: tiny-scorer is no causal language model \\(rm entry"):
        train(load_recipe(on_rm), settings, recipe_path=on_rm)


def test_held_out_groups_keep_a_conversation_opening_on_one_side():
    from datasets import Dataset

    rows = [{"prompt": [{"role": "user", "content": f"opening {i % 10}"}, {"role": "assistant", "content": "a"},
                        {"role": "user", "content": f"turn {i}"}], "chosen": "x", "rejected": "y"} for i in range(40)]
    train_set, held = hold_out(Dataset.from_list(rows), 0.2, "opening", seed=42)
    assert len(train_set) + len(held) == 40 and len(held) == 8  # two whole groups of four
    assert not {opening(r) for r in train_set} & {opening(r) for r in held}
    again = hold_out(Dataset.from_list(rows), 0.2, "opening", seed=42)[1]
    assert [r["prompt"] for r in again] == [r["prompt"] for r in held]  # the seed fixes the split
    record_train, record_held = hold_out(Dataset.from_list(rows), 0.2, "record", seed=42)
    assert len(record_held) == 8 and {opening(r) for r in record_held} & {opening(r) for r in record_train}


def test_held_out_groups_join_a_question_under_two_ids_and_a_chat_asked_again_in_other_case():
    """36 training questions appear under two benchmark ids with the same text; a student asks the same question
    twice with other case and spacing. Neither may sit on both sides of the split."""
    import random

    from datasets import Dataset

    from training.run import QUESTION_COLUMN

    def row(text: str, question: str) -> dict:
        return {"prompt": [{"role": "user", "content": text}], "chosen": "x", "rejected": "y",
                QUESTION_COLUMN: question}

    rows = [row(f"Question {i}: which gas?", f"q{i}") for i in range(40)]
    rows += [row("Question 7: which gas?", "other-id-of-7"), row("question 3 :  Which GAS?", "q3b")]
    for group in ("question", "opening"):
        for seed in range(20):
            train_set, held = hold_out(Dataset.from_list(rows), 0.25, group, seed=seed)
            held_words = {" ".join(opening(r).lower().replace(":", " ").replace("?", " ").split()) for r in held}
            trained_words = {" ".join(opening(r).lower().replace(":", " ").replace("?", " ").split())
                             for r in train_set}
            assert not held_words & trained_words, (group, seed)

    # Where nothing merges, the split is the one earlier versions drew (documented held-out figures reproduce).
    plain = rows[:40]
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(plain):
        groups.setdefault(opening(record), []).append(index)
    keys = sorted(groups)
    random.Random(42).shuffle(keys)
    before: list[int] = []
    for key in keys:
        if len(before) >= 0.25 * len(plain):
            break
        before += groups[key]
    held = hold_out(Dataset.from_list(plain), 0.25, "opening", seed=42)[1]
    assert [r["prompt"] for r in held] == [plain[i]["prompt"] for i in sorted(before)]


def test_records_of_one_question_are_held_out_together_and_the_key_is_never_trained_on(home, tmp_path):
    from datasets import Dataset

    from training.run import QUESTION_COLUMN, read_records

    # A science question's direct and explained records share no message: only meta.question_id ties them.
    kto = tmp_path / "science-kto.jsonl"
    write_jsonl(kto, [KTOExample(prompt=user(f"{form} question {q}"), completion=reply("B" if good else "C"),
                                 label=good, meta={"question_id": f"q{q}"})
                      for q in range(10) for form, good in (("Explain", True), ("Answer", True), ("Answer", False))])
    rows = read_records([kto], "kto", question_ids=True)
    train_set, held = hold_out(Dataset.from_list(rows), 0.2, "question", seed=42)
    assert len(held) == 6 and not set(train_set[QUESTION_COLUMN]) & set(held[QUESTION_COLUMN])
    assert "meta" not in rows[0]

    settings = Settings(home=home)
    path = recipe_file(tmp_path, "tiny-kto-q", {
        "method": "kto", "model": TINY, "output": "tiny-kto-q",
        "data": {"train": str(kto), "eval_fraction": 0.2, "validation_fraction": 0.2, "eval_group": "question"},
        "lora": {"r": 4, "alpha": 8}, "trainer": {**STEPS, "beta": 0.1}})
    summary = json.loads((train(load_recipe(path), settings, recipe_path=path).run_dir / "summary.json").read_text())
    assert (summary["eval_records"], summary["validation_records"]) == (6, 6)  # whole questions: three records each

    bare = tmp_path / "bare.jsonl"
    write_jsonl(bare, [KTOExample(prompt=user("q"), completion=reply("B"), label=True)])
    with pytest.raises(RecipeError, match="record 1 has no meta.question_id"):
        read_records([bare], "kto", question_ids=True)
    with pytest.raises(RecipeError, match="give one of them"):
        load_recipe(recipe_file(tmp_path, "both", {"method": "kto", "model": TINY, "data": {
            "train": str(kto), "eval": str(kto), "eval_fraction": 0.1}}))


def test_balanced_training_pairs_choose_the_longer_reply_as_often_as_the_shorter():
    from datasets import Dataset

    def pair(chosen: int, rejected: int, i: int) -> dict:
        return {"prompt": [{"role": "user", "content": f"q{i}"}],
                "chosen": [{"role": "assistant", "content": "c" * chosen}],
                "rejected": [{"role": "assistant", "content": "r" * rejected}]}

    rows = [pair(9, 3, i) for i in range(7)] + [pair(2, 5, i) for i in range(7, 10)] + [pair(4, 4, 10)]
    balanced = balance_lengths(Dataset.from_list(rows), seed=42)
    lengths = [(len(r["chosen"][0]["content"]), len(r["rejected"][0]["content"])) for r in balanced]
    assert sum(c > w for c, w in lengths) == sum(c < w for c, w in lengths) == 3  # the 3 shorter-chosen set the size
    assert sum(c == w for c, w in lengths) == 1  # a tie favours neither side: kept
    assert [r["prompt"] for r in balance_lengths(Dataset.from_list(rows), seed=42)] == [r["prompt"] for r in balanced]
    assert [r["prompt"] for r in balance_lengths(Dataset.from_list(rows), seed=7)] != [r["prompt"] for r in balanced]
    plain = [{"prompt": f"q{i}", "chosen": "c" * c, "rejected": "r" * r}
             for i, (c, r) in enumerate([(1, 3), (4, 2), (5, 1)])]
    assert len(balance_lengths(Dataset.from_list(plain), seed=42)) == 2  # cloze pairs' plain-text continuations
    with pytest.raises(RecipeError, match="the chosen reply is the longer, so balancing leaves none"):
        balance_lengths(Dataset.from_list(rows[:7] + rows[10:]), seed=42)
    letters = [pair(1, 1, i) for i in range(3)]  # direct-letter pairs: no length to learn, nothing to balance
    assert len(balance_lengths(Dataset.from_list(letters), seed=42)) == 3


def test_a_checkpoint_cut_off_while_saving_is_not_resumed_from(tmp_path):
    """transformers writes trainer_state.json last: a checkpoint without it was cut off while saving (a kill, a full
    disk), and resuming from it started again at step 0 on its weights. The newest whole one is resumed."""
    from training.run import cut_off_checkpoints, holds_training, last_checkpoint

    folder = tmp_path / "checkpoints"
    assert last_checkpoint(tmp_path) is None
    for step, whole in ((9, True), (10, True), (11, False), (100, False)):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"")
        if whole:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-100" / "trainer_state.json").write_text('{"global_step": 1')  # a kill while it was written
    (folder / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == folder / "checkpoint-10"  # by step, not by name: 10 after 9
    assert cut_off_checkpoints(tmp_path) == [folder / "checkpoint-11", folder / "checkpoint-100"]
    for step in (9, 10):
        (folder / f"checkpoint-{step}" / "trainer_state.json").unlink()
    assert last_checkpoint(tmp_path) is None and not holds_training(tmp_path)


def test_a_run_folder_file_cut_off_is_an_error_naming_it(data, tmp_path):
    from training.run import prepare_run_dir

    recipe = load_recipe(recipe_file(tmp_path, "cut", {"method": "sft", "model": TINY, "output": "tiny-cutjson",
                                                       "data": {"train": str(data["sft"])}}))
    run_dir = tmp_path / "run"
    prepare_run_dir(recipe, run_dir, fresh=False, data="d")
    (run_dir / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (run_dir / "recipe.json").write_text('{"digest": "ab')  # a kill while it was written
    with pytest.raises(TrainingError, match="cannot read .*recipe.json .*pass --fresh"):
        prepare_run_dir(recipe, run_dir, fresh=False, data="d")
    assert prepare_run_dir(recipe, run_dir, fresh=True, data="d") is False


def test_a_run_removes_checkpoints_cut_off_while_saving(data, tmp_path):
    """Left in place, a later save of the same step would write into a folder holding the stale files."""
    from training.run import prepare_run_dir

    recipe = load_recipe(recipe_file(tmp_path, "cut", {"method": "sft", "model": TINY, "output": "tiny-cut",
                                                       "data": {"train": str(data["sft"])}}))
    run_dir = tmp_path / "run"
    assert prepare_run_dir(recipe, run_dir, fresh=False, data="d") is False
    whole, cut = run_dir / "checkpoints" / "checkpoint-1", run_dir / "checkpoints" / "checkpoint-2"
    for folder in (whole, cut):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"")
    (whole / "trainer_state.json").write_text("{}")
    assert prepare_run_dir(recipe, run_dir, fresh=False, data="d") is True  # resumes from checkpoint-1
    assert whole.is_dir() and not cut.exists()


def test_resume_from_last_checkpoint_and_refuse_other_recipe(home, data, tmp_path):
    settings = Settings(home=home)
    body = {"method": "sft", "model": TINY, "output": "tiny-resume", "data": {"train": str(data["sft"])},
            "lora": {"r": 4, "alpha": 8}, "trainer": {**STEPS, "max_steps": 2}}
    path = recipe_file(tmp_path, "resume", body)
    first = train(load_recipe(path), settings, recipe_path=path)
    assert (first.run_dir / "checkpoints" / "checkpoint-2").is_dir()
    logged = [json.loads(line)["step"] for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    # The same recipe again, as after a crash before step 2's checkpoint was written: it resumes at step 1, trains
    # step 2 again, and step 2's rows of the stopped run go rather than stand twice in the log.
    import shutil

    shutil.rmtree(first.run_dir / "checkpoints" / "checkpoint-2")
    with (first.run_dir / "metrics.jsonl").open("a") as log:  # and a line the stop cut off part way
        log.write('{"step": 2, "lo')
    again = train(load_recipe(path), settings, recipe_path=path, overwrite=True)
    steps = [json.loads(line)["step"] for line in (again.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1  # step 1 was not trained twice
    assert steps.count(2) == logged.count(2) and steps == logged
    # The summary's loss is the whole run's, not only the steps trained since the checkpoint (found by a review)
    losses = [json.loads(line)["loss"] for line in (again.run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert again.metrics["resumed_from_step"] == 1 and len(losses) == 2
    assert again.metrics["train_loss"] == pytest.approx(sum(losses) / 2)
    # Resumed at the last step, nothing trains: transformers' own figure was 0.0.
    # Resumed at the last step (stopped before it registered), transformers trained a third step of two: the run is
    # trained, and registered as the checkpoint holds it.
    weights = (again.run_dir / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    done = train(load_recipe(path), settings, recipe_path=path, overwrite=True)
    assert done.metrics["resumed_from_step"] == 2 and done.metrics["train_loss"] == pytest.approx(sum(losses) / 2)
    assert [json.loads(line)["step"] for line in (again.run_dir / "metrics.jsonl").read_text().splitlines()] == \
        logged  # no step 3
    assert not (again.run_dir / "checkpoints" / "checkpoint-3").exists()
    assert (done.run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == weights

    other = recipe_file(tmp_path, "resume", {**body, "trainer": {**STEPS, "learning_rate": 0.5}})
    with pytest.raises(TrainingError, match="different recipe; pass --fresh"):
        train(load_recipe(other), settings, recipe_path=other, overwrite=True)
    fresh = train(load_recipe(other), settings, recipe_path=other, overwrite=True, fresh=True)
    assert fresh.entry.manifest.recipe["trainer"]["learning_rate"] == 0.5


def test_a_run_folder_refuses_to_resume_on_data_that_changed(data, tmp_path):
    """The recipe names its data files by path; regenerated data under the same path is another run."""
    import shutil

    from training.run import prepare_run_dir

    body = {"method": "sft", "model": TINY, "output": "tiny-data", "data": {"train": str(data["sft"])}}
    recipe = load_recipe(recipe_file(tmp_path, "data", body))
    run_dir = tmp_path / "run"

    def checkpoint() -> None:  # what a run that got as far as its first save leaves
        (run_dir / "checkpoints" / "checkpoint-1").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "checkpoint-1" / "trainer_state.json").write_text("{}")

    assert prepare_run_dir(recipe, run_dir, fresh=False, data="digest-a") is False
    checkpoint()
    assert prepare_run_dir(recipe, run_dir, fresh=False, data="digest-a") is True  # same data: resumes
    with pytest.raises(TrainingError, match="started on other data.*--fresh"):
        prepare_run_dir(recipe, run_dir, fresh=False, data="digest-b")
    assert prepare_run_dir(recipe, run_dir, fresh=True, data="digest-b") is False
    # The base replaced under its name since: the checkpoints adapt weights it no longer has.
    assert prepare_run_dir(recipe, run_dir, fresh=True, data="digest-b", base_made_at="2026-12-01") is False
    checkpoint()
    assert prepare_run_dir(recipe, run_dir, fresh=False, data="digest-b", base_made_at="2026-12-01") is True
    with pytest.raises(TrainingError, match="started from an earlier .* since replaced.*--fresh"):
        prepare_run_dir(recipe, run_dir, fresh=False, data="digest-b", base_made_at="2026-12-03")
    # Another recipe is refused while the folder holds what it would resume ...
    other = load_recipe(recipe_file(tmp_path, "other", {**body, "trainer": {"learning_rate": 0.5}}))
    with pytest.raises(TrainingError, match="holds a run of a different recipe"):
        prepare_run_dir(other, run_dir, fresh=False, data="digest-b", base_made_at="2026-12-01")
    # ... but an attempt refused before its first checkpoint (a value only the model can check) left nothing to
    # resume or lose: the corrected recipe starts there without --fresh, and the folder records it.
    shutil.rmtree(run_dir / "checkpoints")
    assert prepare_run_dir(other, run_dir, fresh=False, data="digest-b", base_made_at="2026-12-01") is False
    assert json.loads((run_dir / "recipe.json").read_text())["digest"] == other.digest()
    checkpoint()
    with pytest.raises(TrainingError, match="holds a run of a different recipe"):
        prepare_run_dir(recipe, run_dir, fresh=False, data="digest-b", base_made_at="2026-12-01")
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "adapter").mkdir()  # a finished run keeps its adapter: `zephyr train register` reads it by recipe
    with pytest.raises(TrainingError, match="holds a run of a different recipe"):
        prepare_run_dir(recipe, run_dir, fresh=False, data="digest-b", base_made_at="2026-12-01")
    (run_dir / "adapter").rmdir()
    prepare_run_dir(recipe, run_dir, fresh=True, data="digest-b", base_made_at="2026-12-01")
    checkpoint()
    saved = json.loads((run_dir / "recipe.json").read_text())
    del saved["data_digest"], saved["base_made_at"]  # a folder an older version started: resumed as before
    (run_dir / "recipe.json").write_text(json.dumps(saved))
    assert prepare_run_dir(recipe, run_dir, fresh=False, data="digest-c") is True


def test_existing_output_is_not_overwritten_silently(home, data, tmp_path):
    settings = Settings(home=home)
    path = recipe_file(tmp_path, "taken", {"method": "sft", "model": TINY, "output": TINY,
                                           "data": {"train": str(data["sft"])}})
    with pytest.raises(RegistryError, match="already exists"):
        train(load_recipe(path), settings, recipe_path=path)


def test_an_output_other_entries_were_made_from_is_refused_before_training(tmp_path, default_model):
    from training.run import check_output_free
    from zephyr.registry import ModelManifest, Registry

    registry = Registry(tmp_path / "models")
    registry.add(default_model.path, ModelManifest(name="tuned", method="dpo"))
    registry.add(default_model.path, ModelManifest(name="tuned-awq", parent="tuned", method="awq"))
    check_output_free(registry, "tuned-awq", overwrite=True, base="tuned")  # a leaf may be replaced
    with pytest.raises(RegistryError, match="'tuned' is the parent of tuned-awq"):
        check_output_free(registry, "tuned", overwrite=True, base="base")
    registry.remove("tuned-awq")  # a leaf now, yet its own base: add() refused that only after training
    with pytest.raises(RegistryError, match="output 'tuned' is the model being trained"):
        check_output_free(registry, "tuned", overwrite=True, base="tuned")


def test_qlora_without_cuda_says_so(home, data, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: QLoRA runs")
    settings = Settings(home=home)
    path = recipe_file(tmp_path, "qlora", {"method": "sft", "model": TINY, "output": "tiny-qlora", "qlora": True,
                                           "data": {"train": str(data["sft"])}, "trainer": STEPS})
    with pytest.raises(TrainingError, match="QLoRA needs a CUDA GPU"):
        train(load_recipe(path), settings, recipe_path=path)


@pytest.mark.parametrize("method,data_key,extra", [("sft", "sft", {}), ("dpo", "dpo", {"beta": 0.1})])
def test_qlora_trains_on_a_4bit_base_and_merges_into_full_precision(method, data_key, extra, home, data, tmp_path):
    """The CUDA path that CI's CPU cannot take: run on a GPU machine (docs/training.md, "QLoRA on a GPU")."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("QLoRA needs a CUDA GPU; test_qlora_without_cuda_says_so covers this machine")
    from bitsandbytes.nn import Linear4bit
    from safetensors.torch import load_file

    from training.run import _load_model

    settings = Settings(home=home)
    path = recipe_file(tmp_path, f"qlora-{method}", {
        "method": method, "model": TINY, "output": f"tiny-qlora-{method}", "qlora": True,
        "data": {"train": str(data[data_key])}, "lora": {"r": 4, "alpha": 8},
        "trainer": {**STEPS, "max_steps": 3, **extra}})
    recipe = load_recipe(path)
    registry = Registry(settings.models_dir)
    loaded, _ = _load_model(recipe, registry.get(TINY).path)  # what the trainer gets: nf4 linears on the GPU
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, Linear4bit)
    assert loaded.model.layers[0].self_attn.q_proj.weight.quant_type == "nf4"
    assert loaded.device.type == "cuda"
    del loaded

    result = train(recipe, settings, recipe_path=path)
    entry = registry.get(f"tiny-qlora-{method}")
    check_hf_folder(entry.path)
    config = json.loads((entry.path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"  # a plain checkpoint vLLM loads
    assert entry.manifest.recipe["qlora"] is True and entry.manifest.parent == TINY
    assert json.loads((result.run_dir / "summary.json").read_text())["device"] != "CPU"  # ran on the GPU
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {row["step"] for row in logged if "loss" in row} == {1, 2, 3}
    before = load_file(next(registry.get(TINY).path.glob("*.safetensors")))
    after = load_file(next(entry.path.glob("*.safetensors")))
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("q_proj" in k for k in changed)  # the adapter trained on nf4 landed in the bf16 weights
    assert not any("norm" in k or "embed" in k for k in changed)  # only the adapted linears moved


def test_best_of_n_keeps_the_reward_models_favourite(tmp_path):
    class LengthScorer:  # a stand-in reward: longer answers score higher
        def score(self, conversations):
            return [float(len(c[-1]["content"])) for c in conversations]

    prompts = [[{"role": "user", "content": "Why?"}], [{"role": "user", "content": "How?"}]]
    answers = [["short", "a much longer answer", "", CUT_OFF], ["mid size", "tiny", CUT_OFF]]
    examples, stats = best_of_n(prompts, answers, LengthScorer(), min_reward=None)
    assert [e.messages[-1].content for e in examples] == ["a much longer answer", "mid size"]
    assert examples[0].meta["n"] == 2  # neither the empty answer nor the cut-off one is scored
    kept, _ = best_of_n(prompts, answers, LengthScorer(), min_reward=10)
    assert [e.messages[-1].content for e in kept] == ["a much longer answer"]
    assert stats["kept"] == 2 and stats["prompts"] == 2 and stats["answers_cut_off"] == 2
    # each example carries its prompt's cleaning stamp, which `zephyr train` judges (it warned of every example)
    assert "cleaned" not in examples[0].meta
    stamped, _ = best_of_n(prompts, answers, LengthScorer(), min_reward=None, stamps=[["pii"], False])
    assert [e.meta["cleaned"] for e in stamped] == [["pii"], False]
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": [{"role": "user", "content": "Q1"}], "meta": {"cleaned": ["pii"]}}\n\n'
                    '{"messages": [{"role": "user", "content": "Q2"}]}\n'
                    '{"prompt": [{"role": "user", "content": "Q3"}], "meta": {"kept": {"flagged": true}}}\n')
    assert read_prompts_and_stamps(file)[1] == [["pii"], None, False]  # a raw review export's: never cleaned


def test_an_rs_or_sft_record_trains_on_its_last_answer_only(home, tmp_path):
    """TRL learned the whole conversation of a `messages` record: the user's turns and earlier assistant turns no
    reward model chose. As prompt and completion it learns the completion only."""
    from trl import SFTConfig, SFTTrainer

    from training.run import read_records

    file = tmp_path / "rs-data.jsonl"
    conversation = [{"role": "system", "content": "Be a tutor."}, {"role": "user", "content": "Why is it blue?"},
                    {"role": "assistant", "content": "Earlier."}, {"role": "user", "content": "And red?"},
                    {"role": "assistant", "content": "Scattering."}]
    write_jsonl(file, [SFTExample(messages=conversation)])
    (row,) = read_records([file], "rs")
    assert row == {"prompt": conversation[:-1], "completion": conversation[-1:]}
    # and a reviewers' export: only the answer they approved, not the student's turns nor earlier answers
    assert read_records([file], "sft") == [row]
    from datasets import Dataset

    model_path = Registry(home / "models").get(TINY).path
    trainer = SFTTrainer(model=str(model_path), args=SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True,
                                                                report_to="none"),
                         train_dataset=Dataset.from_list([row]))
    sample = trainer.train_dataset[0]
    tokenizer = trainer.processing_class
    learned = [t for t in sample["labels"] if t != -100]
    assert tokenizer.decode(learned).startswith("Scattering.") and "Earlier" not in tokenizer.decode(learned)
    write_jsonl(file, [SFTExample(messages=conversation[:2])])
    with pytest.raises(RecipeError, match="ends with the assistant answer it teaches"):
        read_records([file], "rs")


def test_rs_prompts_accept_pairs_and_conversations(tmp_path):
    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps({"prompt": [{"role": "user", "content": "Q1"}], "chosen": [], "rejected": []}) + "\n" +
                    json.dumps({"messages": [{"role": "user", "content": "Q2"},
                                             {"role": "assistant", "content": "A2"}]}) + "\n")
    assert read_prompts_and_stamps(file)[0] == [[{"role": "user", "content": "Q1"}],
                                                [{"role": "user", "content": "Q2"}]]
    file.write_text(json.dumps({"messages": [{"role": "assistant", "content": "only"}]}) + "\n")
    with pytest.raises(ValueError, match="end with a user message"):
        read_prompts_and_stamps(file)
    file.write_bytes('{"prompt": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"))
    with pytest.raises(RecipeError, match="cannot read the prompts file"):
        read_prompts_and_stamps(file)


def test_grpo_trains_on_verifiable_prompts_and_logs_its_rewards(home, tmp_path):
    """GRPO: TRL's own generation samples a group of answers per prompt, training/rewards.py scores them, and the
    result is a registry entry like any other method's."""
    from zephyr.schemas import VerifiablePrompt

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [VerifiablePrompt(prompt=user(f"Question {i}: which is a gas?\n\nA. rock\nB. air\n\n"
                                                       "Explain, then give the letter."),
                                           answer="B", letters="AB", source="test") for i in range(4)])
    settings = Settings(home=home)
    path = recipe_file(tmp_path, "tiny-grpo", {
        "method": "grpo", "model": TINY, "output": "tiny-grpo", "data": {"train": str(prompts)},
        "rewards": {"served_letter": 1.0, "correct_letter": 1.0, "answer_format": 0.5}, "lora": {"r": 4, "alpha": 8},
        "trainer": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2,
                    "max_completion_length": 8, "logging_steps": 1, "save_steps": 1, "learning_rate": 1.0e-3}})
    result = train(load_recipe(path), settings, recipe_path=path)
    entry = Registry(settings.models_dir).get("tiny-grpo")
    check_hf_folder(entry.path)
    assert entry.manifest.method == "grpo" and entry.manifest.parent == TINY
    assert entry.manifest.recipe["rewards"] == {"served_letter": 1.0, "correct_letter": 1.0, "answer_format": 0.5,
                                                "reward_model": None, "reward_model_weight": 0.5}
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [row for row in logged if "rewards/correct_letter/mean" in row]
    assert {row["step"] for row in rewards} == {1, 2}
    assert all("rewards/answer_format/mean" in row and "rewards/served_letter/mean" in row for row in rewards)
    assert all(0.0 <= row["reward"] <= 2.5 for row in logged if "reward" in row)  # weighted: 1 + 1 + 0.5 at most


def test_served_letter_reads_the_letter_as_mcq_explain_serves_it(home):
    """The reward's letter is the one the service would serve for the same reasoning: mcq.encode_prompt with the
    reasoning cut at the first answer line, the cue, and the argmax over the letter tokens, by the same model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.rewards import ServedLetter
    from zephyr import mcq

    path = Registry(Settings(home=home).models_dir).get(TINY).path
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    question = mcq.MCQuestion.build("Which is a gas?", ["rock", "air", "wood"])
    prompt = mcq.render_messages(question, explain=True)
    reasonings = ["Air is a gas at room temperature.", "Rock is solid. Answer: A and more text", "x" * 30,
                  "\n  Air flows.  "]
    reward = ServedLetter()
    reward.bind(model, tokenizer)
    model.train()  # as TRL holds the policy when it asks for rewards: dropout must not reach the served letter
    got = reward.letters_of([prompt] * 4, [[{"role": "assistant", "content": r}] for r in reasonings], ["ABC"] * 4)
    assert model.training  # handed back as it was
    model.eval()
    for reasoning, letter in zip(reasonings, got, strict=True):
        # the service stops generating at the answer line and strips what it kept (service/tutor.py answer_mcq)
        kept = reasoning.split("Answer:")[0].strip()
        ids = mcq.encode_prompt(tokenizer, question, explain=True, reasoning=kept)
        assert reward.served_ids(prompt, [{"role": "assistant", "content": reasoning}]) == ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        served = "ABC"[int(torch.argmax(logits[mcq.letter_token_ids(tokenizer, 3, leading_space=True)]))]
        assert letter == served
    scores = reward(prompts=[prompt] * 3, completions=[[{"role": "assistant", "content": r}] for r in reasonings[:3]],
                    answer=got[:2] + ["ABC".replace(got[2], "")[0]], letters=["ABC"] * 3)
    assert scores == [1.0, 1.0, 0.0]


def test_curve_legends_name_grpo_rewards_and_the_held_out_curve():
    from training.plots import curve_label

    assert [curve_label(k) for k in ("rewards/served_letter/mean", "rewards/answer_format/mean", "eval_loss",
                                     "loss", "rewards/margins")] == \
        ["served_letter", "answer_format", "held out", "train", "train"]
    assert curve_label("eval_loss", validation=True) == "validation"  # what the trainer watched: not held out


def test_grpos_rewards_panel_plots_every_logged_reward_a_reward_models_too():
    """The panel named the three built-in rewards: a `rewards.reward_model`'s curve was logged and never drawn."""
    from training.plots import logged_keys

    rows = [{"step": 1, "reward": 0.4, "rewards/correct_letter/mean": 1.0, "rewards/tutor-rm/mean": 0.3,
             "rewards/correct_letter/std": 0.1}, {"step": 2, "rewards/answer_format/mean": 1.0}]
    assert logged_keys(rows, ["reward", "rewards/*/mean"]) == [
        "reward", "rewards/correct_letter/mean", "rewards/tutor-rm/mean", "rewards/answer_format/mean"]


def test_ranked_samples_are_reused_only_for_the_same_sampling(tmp_path):
    data, provenance_file = tmp_path / "rs-data.jsonl", tmp_path / "rs-sampling.json"
    provenance = {"model": "m", "reward_model": "rm", "prompts_digest": "abc", "sampling": {"n": 4, "limit": 300}}
    assert _reusable_stats(data, provenance_file, provenance) is None  # nothing saved yet
    data.write_text("{}\n")
    provenance_file.write_text(json.dumps(provenance | {"stats": {"kept": 300}}))
    assert _reusable_stats(data, provenance_file, provenance) == {"kept": 300}
    for changed in ({"sampling": {"n": 8, "limit": 300}}, {"prompts_digest": "def"}, {"reward_model": "rm2"}):
        assert _reusable_stats(data, provenance_file, provenance | changed) is None
    provenance_file.write_text("{not json")
    assert _reusable_stats(data, provenance_file, provenance) is None


def test_sft_records_whose_prompt_fills_max_length_are_left_out_and_counted(home):
    """TRL truncates such a record to one with no answer token to learn and drops it without a word."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from training.run import with_room

    tokenizer = AutoTokenizer.from_pretrained(Registry(home / "models").get(TINY).path)
    rows = [{"prompt": [{"role": "user", "content": "Why is the sky blue?"}],
             "completion": [{"role": "assistant", "content": "Scattering."}]},
            {"prompt": [{"role": "user", "content": "word " * 400}],
             "completion": [{"role": "assistant", "content": "Too late."}]}]
    kept, left_out = with_room(Dataset.from_list(rows), tokenizer, 128)
    assert left_out == 1 and [r["completion"][0]["content"] for r in kept] == ["Scattering."]
    assert with_room(Dataset.from_list(rows), tokenizer, None)[1] == 0


def test_sampling_from_a_server_that_refuses_names_the_server_and_the_way_out(tmp_path):
    """An openai error (another model served: 404) escaped as a traceback; now it names the server and the prompt."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from training.recipes import SamplingSpec
    from training.rs import sample_server

    asked: list[str] = []

    class NotThisModel(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            asked.append(self.path)
            body = json.dumps({"error": {"message": "no model 'tiny'", "type": "not_found",
                                         "code": "model_not_found"}}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotThisModel)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    spec = SamplingSpec(reward_model="rm", prompts=tmp_path / "p.jsonl", n=2)
    try:
        for url in (f"http://127.0.0.1:{server.server_port}", f"http://127.0.0.1:{server.server_port}/v1/"):
            with pytest.raises(TrainingError, match=r"sampling.server .* failed on prompt 1 of 1 \(NotFoundError"):
                sample_server(url, "tiny", [[{"role": "user", "content": "Hi"}]], spec, None)
    finally:
        server.shutdown()
    assert asked == ["/v1/chat/completions"] * 2  # a URL given with its /v1 is not asked at /v1/v1


def test_an_rs_rerun_with_other_sampling_refuses_to_delete_the_earlier_samples_without_fresh(tmp_path, default_model):
    """It deleted the earlier run's samples and checkpoints without a word, before sampling anew (which may fail)."""
    from training.rs import PROVENANCE_FILE, SAMPLES_FILE, run_rejection_sampling

    registry = Registry(tmp_path / "models")
    tiny = make_tiny_llama(registry, default_model)
    registry.add(tiny.path, ModelManifest(name="tiny-rm", method="rm", source="tests: a stand-in reward model"))
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [SFTExample(messages=user("Why is the sky blue?") + reply("Scattering."))])
    recipe_path = recipe_file(tmp_path, "rs", {"method": "rs", "model": TINY, "output": "tiny-rs",
                                               "sampling": {"reward_model": "tiny-rm", "prompts": str(prompts),
                                                            "n": 2, "max_tokens": 8},
                                               "trainer": {**STEPS, "max_length": 1024}})
    run_dir = tmp_path / "runs" / "tiny-rs"
    run_dir.mkdir(parents=True)
    (run_dir / SAMPLES_FILE).write_text('{"messages": []}\n')
    (run_dir / PROVENANCE_FILE).write_text(json.dumps({"sampling": {"n": 8}, "stats": {"kept": 1}}))
    with pytest.raises(TrainingError, match="--fresh"):
        run_rejection_sampling(load_recipe(recipe_path), Settings(home=tmp_path), recipe_path=recipe_path)
    assert (run_dir / SAMPLES_FILE).read_text() == '{"messages": []}\n'


def test_rs_refuses_never_cleaned_prompts_before_sampling_unless_the_recipe_allows_them(tmp_path, default_model):
    """A prompt written with --no-clean made examples stamped never cleaned, which the SFT then refused after the
    sampling, with advice (`data.allow_uncleaned`) an rs recipe cannot take."""
    from training.data.clean import stamped_cleaned
    from training.rs import run_rejection_sampling
    from training.run import data_spec

    registry = Registry(tmp_path / "models")
    tiny = make_tiny_llama(registry, default_model)
    registry.add(tiny.path, ModelManifest(name="tiny-rm", method="rm", source="tests: a stand-in reward model"))
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [stamped_cleaned(SFTExample(messages=user("Why is the sky blue?") + reply("Scattering.")),
                                          False)])
    body = {"method": "rs", "model": TINY, "output": "tiny-rs", "trainer": {**STEPS, "max_length": 1024},
            "sampling": {"reward_model": "tiny-rm", "prompts": str(prompts), "n": 2, "max_tokens": 8}}
    recipe_path = recipe_file(tmp_path, "rs", body)
    with pytest.raises(RecipeError, match=r"prompts\.jsonl: 1 prompts were never cleaned .*sampling.allow_uncleaned"):
        run_rejection_sampling(load_recipe(recipe_path), Settings(home=tmp_path), recipe_path=recipe_path)
    assert not (tmp_path / "runs" / "tiny-rs").exists()  # nothing sampled
    # allowed: the SFT's own check, on the examples stamped never cleaned as their prompt, reads the same opt-in
    allowed = load_recipe(recipe_file(tmp_path, "rs-allowed", {
        **body, "sampling": {**body["sampling"], "allow_uncleaned": True}}))
    assert data_spec(allowed, [prompts]).allow_uncleaned and not data_spec(load_recipe(recipe_path), [prompts]) \
        .allow_uncleaned


def test_measured_records_whose_prompt_fills_max_length_are_left_out_and_counted(home, data, tmp_path):
    """Only the training part was filtered: TRL cut such an eval record to no answer token, and it left the loss
    without a word."""
    import math

    eval_file = tmp_path / "eval.jsonl"
    write_jsonl(eval_file, [SFTExample(messages=user("Why is the sea salty?") + reply("Rivers carry salts.")),
                            SFTExample(messages=user("word " * 100) + reply("Too late."))])
    path = recipe_file(tmp_path, "tiny-sft-room", {
        "method": "sft", "model": TINY, "output": "tiny-sft-room",
        "data": {"train": str(data["sft"]), "eval": [str(eval_file)]}, "lora": {"r": 4, "alpha": 8},
        "trainer": STEPS})
    result = train(load_recipe(path), Settings(home=home), recipe_path=path)
    assert result.metrics["eval_records_without_room"] == 1 and "train_records_without_room" not in result.metrics
    assert math.isfinite(result.metrics["eval_loss"])


def test_a_recipe_the_trainer_refuses_is_a_training_error_not_a_traceback(home, data, tmp_path):
    """TRL checks some settings only as it builds the trainer (KTO needs a batch of more than one): a ValueError
    traceback after the model had loaded."""
    from training.run import TrainingError

    path = recipe_file(tmp_path, "tiny-kto-one", {
        "method": "kto", "model": TINY, "output": "tiny-kto-one", "data": {"train": str(data["kto"])},
        "lora": {"r": 4, "alpha": 8}, "trainer": {**STEPS, "per_device_train_batch_size": 1}})
    with pytest.raises(TrainingError, match="the trainer refused the recipe"):
        train(load_recipe(path), Settings(home=home), recipe_path=path)


def test_records_written_with_no_clean_are_refused_until_cleaned(home, data, tmp_path, capsys):
    """`data ... --no-clean` stamps its records never cleaned (it may be run where Presidio is missing, to clean
    later); training refuses them, naming the file, before a model is loaded or a run folder made, unless the recipe
    says data.allow_uncleaned. Cleaned and hand-made records are counted, not refused."""
    from rich.console import Console

    from training.data.clean import stamped_cleaned
    from training.recipes import DataSpec
    from training.run import checked_cleaning

    records = list(read_jsonl(data["sft"], SFTExample))
    never, cleaned, mixed = tmp_path / "never.jsonl", tmp_path / "cleaned.jsonl", tmp_path / "mixed.jsonl"
    write_jsonl(never, [stamped_cleaned(r, False) for r in records])
    write_jsonl(cleaned, [stamped_cleaned(r, ["pii", "decontaminate"]) for r in records])
    write_jsonl(mixed, [stamped_cleaned(records[0], False), *records[1:]])
    settings = Settings(home=home)
    path = recipe_file(tmp_path, "tiny-uncleaned", {
        "method": "sft", "model": TINY, "output": "tiny-uncleaned", "data": {"train": [str(cleaned), str(mixed)]},
        "lora": {"r": 4, "alpha": 8}, "trainer": STEPS})
    with pytest.raises(RecipeError, match=r"never cleaned: .*mixed\.jsonl \(1\)\. Run `zephyr data clean") as refused:
        train(load_recipe(path), settings, recipe_path=path)
    assert "cleaned.jsonl" not in str(refused.value).replace("mixed.jsonl", "")
    assert not (home / "runs" / "tiny-uncleaned").exists()

    console = Console(record=True, width=200)
    counts = checked_cleaning([cleaned, mixed, never], DataSpec(train=[never], allow_uncleaned=True), console)
    assert counts == {"cleaned": 8, "cleaned_partly": 0, "never_cleaned": 9, "unstamped": 7}
    # a review export's records that `zephyr data review` never read are students' words: never cleaned
    from training.data.clean import cleaning_of

    assert cleaning_of({"kept": {"flagged": True}}) == "never_cleaned"
    assert cleaning_of({"kept": {"for_training": True}}) == "unstamped"
    assert cleaning_of({"kept": {"for_training": True}, "cleaned": ["pii"]}) == "cleaned_partly"  # no decontamination
    assert cleaning_of({"cleaned": ["length", "decontaminate", "pii"]}) == "cleaned"
    assert "9 records were never cleaned" in console.export_text()
    assert checked_cleaning([cleaned], DataSpec(train=[cleaned]), console)["cleaned"] == 8

    # data.limit stops the training files where read_records does: a never-cleaned record past it never trains;
    # a held-out file is read whole, so its records count past the limit
    tail = tmp_path / "tail.jsonl"
    write_jsonl(tail, [*(stamped_cleaned(r, ["pii", "decontaminate"]) for r in records[:3]),
                       stamped_cleaned(records[3], False)])
    limited = DataSpec(train=[tail], limit=3)
    assert checked_cleaning([tail], limited, console) == {
        "cleaned": 3, "cleaned_partly": 0, "never_cleaned": 0, "unstamped": 0}
    with pytest.raises(RecipeError, match=r"never cleaned: .*never\.jsonl \(8\)"):
        checked_cleaning([tail], limited, console, [never])
    with pytest.raises(RecipeError, match=r"tail\.jsonl \(1\)"):
        checked_cleaning([tail], DataSpec(train=[tail], limit=4), console)


def test_a_reward_model_registered_from_a_copied_run_folder_keeps_its_held_out_agreement(
        home, data, tmp_path, default_model):
    """`train register` left a GPU box's reward model without `heldout_agreement`: the report's reward-model table
    read nothing for it."""
    import shutil

    path = recipe_file(tmp_path, "rm-elsewhere", {
        "method": "rm", "model": TINY, "output": "tiny-rm-elsewhere",
        "data": {"train": str(data["dpo"]), "eval_fraction": 0.25}, "lora": {"r": 4, "alpha": 8}, "trainer": STEPS})
    trained = train(load_recipe(path), Settings(home=home), recipe_path=path)
    here = Settings(home=tmp_path / "here")
    make_tiny_llama(Registry(here.models_dir), default_model)
    shutil.copytree(trained.run_dir, here.home / "runs" / "tiny-rm-elsewhere")
    register_run(load_recipe(path), here, recipe_path=path)
    there = Registry(Settings(home=home).models_dir).get("tiny-rm-elsewhere").manifest.evals["heldout_agreement"]
    assert Registry(here.models_dir).get("tiny-rm-elsewhere").manifest.evals["heldout_agreement"] == there
    assert there["n"] == 2 and trained.metrics["heldout_pairs"] == 2
