"""Recipes fail before any model loads, with a message naming the key, file or line to fix; the shipped recipes
parse; overrides reach the right field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.recipes import RecipeError, load_recipe, parse_overrides
from training.run import read_records
from zephyr.schemas import Message, PreferencePair, SFTExample, write_jsonl

RECIPES = sorted(Path("training/recipes").glob("*.yaml"))


@pytest.fixture
def pairs(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [PreferencePair(prompt=[Message(role="user", content="Why?")],
                                      chosen=[Message(role="assistant", content="Because.")],
                                      rejected=[Message(role="assistant", content="No.")], source="t")])
    return path


def write(tmp_path: Path, body: dict | str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return path


def test_shipped_recipes_are_valid(monkeypatch, tmp_path):
    assert {"dpo-science.yaml", "kto-science.yaml", "sft-tutor.yaml", "rm-hh.yaml", "rs-hh.yaml"} <= \
        {p.name for p in RECIPES}
    for recipe in RECIPES:
        body = yaml.safe_load(recipe.read_text())
        # Point every data file at an empty stand-in: the recipes name files `zephyr data` builds.
        for section, key in (("data", "train"), ("data", "eval"), ("sampling", "prompts")):
            if body.get(section, {}).get(key):
                stand_in = tmp_path / Path(str(body[section][key])).name
                stand_in.touch()
                body[section][key] = str(stand_in)
        loaded = load_recipe(write(tmp_path, body))
        assert loaded.method == body["method"] and loaded.output


@pytest.mark.parametrize("body,message", [
    ({"method": "dpo", "data": {"train": "PAIRS"}, "learning_rate": 1}, "learning_rate: unknown key"),
    ({"method": "dpo", "data": {"train": "PAIRS", "shuffle": True}}, "data.shuffle: unknown key"),
    ({"method": "dpo", "data": {"train": "PAIRS"}, "trainer": {"betta": 0.1}},
     "trainer.betta is not an argument of TRL's DPOConfig; did you mean 'beta'"),
    ({"method": "dpo", "data": {"train": "PAIRS"}, "trainer": {"output_dir": "x"}}, "set by `zephyr train` itself"),
    ({"method": "dpo", "data": {"train": "PAIRS"}, "trainer": {"push_to_hub": False, "hub_model_id": "me/tutor"}},
     "trainer.hub_model_id: a run never uploads"),
    ({"method": "dpo", "data": {"train": "missing.jsonl"}}, "data file missing.jsonl does not exist"),
    # held-out figures measured on what trained (found by a review)
    ({"method": "dpo", "data": {"train": "PAIRS", "eval": "PAIRS"}}, "data.eval names a training file too"),
    ({"method": "dpo"}, "needs a `data` section"),
    ({"method": "ppo", "data": {"train": "PAIRS"}}, "method"),
    ({"method": "rs", "data": {"train": "PAIRS"}}, "needs a `sampling` section"),
    ({"method": "dpo", "data": {"train": "PAIRS"}, "output": "Bad Name"}, "output"),
    ({"method": "sft", "data": {"train": "PAIRS"}, "qlora": True, "lora": None}, "qlora trains a LoRA adapter"),
    ({"method": "dpo", "data": {"train": "PAIRS"}, "rewards": {}}, "`rewards` belongs to method grpo, not dpo"),
    ({"method": "sft", "data": {"train": "PAIRS", "balance_lengths": True}},
     "data.balance_lengths needs preference pairs (method rm or dpo), not sft"),
    ({"method": "grpo", "data": {"train": "PAIRS"}, "rewards": {"served_letter": 0, "answer_format": 0}},
     "every weight is 0"),
    ({"method": "grpo", "data": {"train": "PAIRS"}, "trainer": {"reward_weights": [1.0]}},
     "trainer.reward_weights is set from `rewards`"),
    ({"method": "grpo", "data": {"train": "PAIRS"}, "rewards": {"correct_letter": -1}}, "rewards.correct_letter"),
    ({"method": "grpo", "data": {"train": "PAIRS"}, "trainer": {"num_generation": 4}},
     "not an argument of TRL's GRPOConfig; did you mean 'num_generations'"),
    # TRL only logs that it ignores them for a model it is given (found by a review)
    ({"method": "sft", "data": {"train": "PAIRS"}, "trainer": {"model_init_kwargs": {"dtype": "bfloat16"}}},
     "trainer.model_init_kwargs would be ignored"),
    # TRL cannot score the held-out part after training: the run trained, then crashed unregistered, and every
    # rerun resumed into the same crash
    ({"method": "dpo", "lora": None, "trainer": {"precompute_ref_log_probs": True},
      "data": {"train": "PAIRS", "eval_fraction": 0.1, "validation_fraction": 0.1}},
     "full fine-tuning dpo with trainer.precompute_ref_log_probs cannot score the held-out part"),
])
def test_bad_recipes_name_the_problem(tmp_path, pairs, body, message):
    body = yaml.safe_load(yaml.safe_dump(body).replace("PAIRS", str(pairs)))
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("`", ".")):
        load_recipe(write(tmp_path, body))


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "method: [dpo"))
    with pytest.raises(RecipeError, match="must hold a mapping"):
        load_recipe(write(tmp_path, "- dpo"))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("method: dpo\ndescription: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="cannot read the recipe .*latin1.yaml"):
        load_recipe(latin1)


def test_method_must_match_the_command(tmp_path, pairs):
    path = write(tmp_path, {"method": "kto", "data": {"train": str(pairs)}})
    with pytest.raises(RecipeError, match="is a kto recipe; run it with `zephyr train kto`"):
        load_recipe(path, method="dpo")


def test_overrides(tmp_path, pairs):
    path = write(tmp_path, {"method": "dpo", "data": {"train": str(pairs)}, "trainer": {"beta": 0.1}})
    recipe = load_recipe(path, ["trainer.beta=0.25", "lora.r=4", "output=my-run", "trainer.loss_type=[ipo]"])
    assert recipe.trainer == {"beta": 0.25, "loss_type": ["ipo"]} and recipe.lora.r == 4
    assert recipe.output_name(path) == "my-run"
    assert load_recipe(path, ["lora=null"]).lora is None  # full fine-tuning
    assert load_recipe(path).output_name(path) == "smollm2-135m-instruct-recipe"
    assert load_recipe(path).digest() != recipe.digest()
    with pytest.raises(RecipeError, match="must look like key=value"):
        parse_overrides(["trainer.beta"])
    with pytest.raises(RecipeError, match="trainer.gamma is not an argument"):
        load_recipe(path, ["trainer.gamma=1"])
    with pytest.raises(RecipeError, match=r"override 'data.train=\[a,': its value is not YAML"):
        parse_overrides(["data.train=[a,"])


def test_numbers_in_exponent_form_are_numbers_in_files_and_overrides(tmp_path, pairs):
    """PyYAML reads `5e-5` (YAML 1.1) as a string, which TRL met as a TypeError deep in the optimizer."""
    path = write(tmp_path, f"method: dpo\ndata: {{train: {pairs}}}\ntrainer: {{learning_rate: 5e-5, beta: 1E-1}}\n")
    assert load_recipe(path).trainer == {"learning_rate": 5e-5, "beta": 0.1}
    recipe = load_recipe(path, ["trainer.learning_rate=2e-4", "trainer.max_steps=3", "trainer.run_name=1e5x"])
    assert recipe.trainer["learning_rate"] == 2e-4 and isinstance(recipe.trainer["max_steps"], int)
    assert recipe.trainer["run_name"] == "1e5x"


def test_a_trainer_value_of_the_wrong_type_names_the_key(tmp_path, pairs):
    path = write(tmp_path, {"method": "dpo", "data": {"train": str(pairs)}})
    with pytest.raises(RecipeError, match=r"trainer.learning_rate must be a number, not 'fast'"):
        load_recipe(path, ["trainer.learning_rate=fast"])
    with pytest.raises(RecipeError, match=r"trainer.max_steps must be a whole number, not 2.5"):
        load_recipe(path, ["trainer.max_steps=2.5"])
    with pytest.raises(RecipeError, match=r"trainer.bf16 must be true or false, not 'sometimes'"):
        load_recipe(path, ["trainer.bf16=sometimes"])
    assert load_recipe(path, ["trainer.learning_rate=1"]).trainer["learning_rate"] == 1  # an int is a number


def test_data_in_the_wrong_schema_fails_naming_file_and_line(tmp_path, pairs):
    sft = tmp_path / "sft.jsonl"
    write_jsonl(sft, [SFTExample(messages=[Message(role="user", content="Q"), Message(role="assistant", content="A")])])
    with pytest.raises(RecipeError, match=rf"{sft}:1: not a PreferencePair.*dpo needs PreferencePair records"):
        read_records([sft], "dpo")
    rows = read_records([pairs], "dpo")
    assert set(rows[0]) == {"prompt", "chosen", "rejected"}  # provenance stays out of the trainer


def test_recipes_without_later_fields_keep_the_digest_they_had_before_them(tmp_path, pairs):
    """A run folder resumes only for the same digest: adding grpo's `rewards`, `data.eval_group`,
    `data.validation_fraction`, `data.balance_lengths`, `data.end_with_eos`, `lora.top_layers` or `sampling.limit`
    must not change the recipes that do not use them."""
    recipe = load_recipe(write(tmp_path, {"method": "dpo", "data": {"train": str(pairs)}}))
    resolved = recipe.resolved()
    assert "rewards" not in resolved and "eval_group" not in resolved["data"] and "top_layers" not in resolved["lora"]
    assert set(resolved["data"]) == {"train", "eval", "eval_fraction", "limit"}
    assert set(resolved["lora"]) == {"r", "alpha", "dropout", "target_modules"}
    grouped = load_recipe(write(tmp_path, {"method": "dpo", "data": {"train": str(pairs), "eval_group": "opening"},
                                           "lora": {"top_layers": 4}}))
    assert grouped.resolved()["data"]["eval_group"] == "opening" and grouped.resolved()["lora"]["top_layers"] == 4
    assert grouped.digest() != recipe.digest()
    carved = load_recipe(write(tmp_path, {"method": "dpo", "data": {"train": str(pairs), "validation_fraction": 0.1}}))
    assert carved.resolved()["data"]["validation_fraction"] == 0.1 and carved.digest() != recipe.digest()
    balanced = load_recipe(write(tmp_path, {"method": "dpo", "data": {"train": str(pairs), "balance_lengths": True}}))
    assert balanced.resolved()["data"]["balance_lengths"] is True and balanced.digest() != recipe.digest()
    grpo = load_recipe(write(tmp_path, {"method": "grpo", "data": {"train": str(pairs)}}))
    assert grpo.resolved()["rewards"]["served_letter"] == 1.0
    sampling = {"reward_model": "rm", "prompts": str(pairs)}
    rs = load_recipe(write(tmp_path, {"method": "rs", "sampling": sampling}))
    assert "limit" not in rs.resolved()["sampling"]
    capped = load_recipe(write(tmp_path, {"method": "rs", "sampling": sampling | {"limit": 300}}))
    assert capped.resolved()["sampling"]["limit"] == 300 and capped.digest() != rs.digest()


@pytest.mark.parametrize(("method", "trainer", "warned"), [
    ("dpo", {}, True), ("kto", {}, True), ("rm", {}, True), ("dpo", {"disable_dropout": False}, False),
    ("sft", {}, False),
])
def test_a_lora_dropout_trl_turns_off_is_warned_of(tmp_path, caplog, method, trainer, warned):
    """TRL's DPO, KTO and reward trainers zero every dropout after wrapping the model, LoRA's too: the recipes'
    dropout 0.05 did nothing, silently."""
    from training.recipes import Recipe
    from training.run import build_args

    recipe = Recipe.model_validate({"method": method, "model": "m", "output": "o", "data": {"train": "x.jsonl"},
                                    "lora": {"r": 4, "alpha": 8, "dropout": 0.05}, "trainer": trainer})
    build_args(recipe, tmp_path, has_eval=False)
    assert ("lora.dropout 0.05 has no effect" in caplog.text) is warned
