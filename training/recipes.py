"""Training recipes: one YAML file per run (alignment-handbook style), validated before any work starts.

A recipe names the base registry model, the data, the adapter and the TRL trainer arguments. Everything is
checked up front (unknown keys anywhere, TRL arguments the method's config does not have, data files that do
not exist or do not hold the method's schema), so a bad recipe fails in a second with a message that names
the problem instead of after the model has loaded."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zephyr.registry import RegistryError, check_name
from zephyr.settings import DEFAULT_MODEL

Method = Literal["sft", "rm", "rs", "dpo", "kto", "grpo"]
METHODS: tuple[str, ...] = ("sft", "rm", "rs", "dpo", "kto", "grpo")
# Arguments the runner owns: the run folder decides where checkpoints go, the device decides use_cpu.
RESERVED_TRAINER_KEYS = {"output_dir", "use_cpu", "resume_from_checkpoint"}


# (section, field, default) of every field added after recipes had been run; see Recipe.resolved.
LATER_FIELDS: tuple[tuple[str | None, str, Any], ...] = (
    (None, "rewards", None), ("data", "eval_group", "record"), ("lora", "top_layers", None),
    ("sampling", "limit", None), ("data", "validation_fraction", 0.0), ("data", "balance_lengths", False),
    ("data", "end_with_eos", False), ("data", "split_seed", 42), ("sampling", "keep_cut_off", False),
    ("data", "allow_uncleaned", False), ("sampling", "allow_uncleaned", False))


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 floats and booleans: PyYAML follows YAML 1.1, which reads `5e-5` (no dot) as the string '5e-5', and
    `no`, `off`, `yes`, `on` as booleans (`save_strategy: no` became False, which TRL refuses)."""


_BOOL = "tag:yaml.org,2002:bool"
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RecipeLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"),
    list("-+0123456789."))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, the key and what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    train: list[Path] = Field(min_length=1, description="JSON Lines files in the method's schema")
    eval: list[Path] = []
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=0.5,
                                 description="held out from train when no eval file is given")
    validation_fraction: float = Field(
        default=0.0, ge=0.0, lt=0.5, description="carved from what is left to train on, grouped as eval_fraction is: "
        "the trainer evaluates on it instead of the held-out part, so hyper-parameters are chosen on validation and "
        "the held-out figure is reported, never tuned on; the held-out part is scored once, after training "
        "(`heldout_*` in summary.json; a reward model's as `heldout_agreement`)")
    limit: int | None = Field(default=None, gt=0, description="use only the first N training records")
    split_seed: int = Field(default=42, description="which records the held-out, validation and length-balancing "
                            "draws take; not trainer.seed, so a sweep over the trainer's seed is scored on the same "
                            "held-out records (42 was trainer.seed's default, which the split used before)")
    balance_lengths: bool = Field(
        default=False, description="preference pairs only (rm, dpo): drop training pairs, by data.split_seed, "
        "until people chose the longer reply as often as the shorter one, so that length alone predicts nothing "
        "the model trains on; validation and held-out parts keep every pair")
    end_with_eos: bool = Field(
        default=False, description="sft on plain-text (cloze) examples only: train the tokenizer's end-of-sequence "
        "token after each completion too, so the examples say where an answer ends; the served cloze score has no "
        "such term, so this trades a little of what the loss matches for answers that stop")
    allow_uncleaned: bool = Field(
        default=False, description="train on records written with --no-clean that `zephyr data clean` never ran "
        "on, or a raw review export's (students' PII unredacted, benchmark questions not removed): refused unless "
        "this is set; the model's manifest counts them (stats.data_cleaning)")
    eval_group: Literal["record", "opening", "question"] = Field(
        default="record", description="what eval_fraction holds out: single records, whole groups of records "
        "whose prompts open with the same message (hh-rlhf transcripts that share a first turn stay on one side), or "
        "whole groups built from one benchmark question (`meta.question_id`: a science question's explained and "
        "direct records, which share no message)")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | Path) else value

    @model_validator(mode="after")
    def _one_held_out_part(self) -> DataSpec:
        if self.eval and self.eval_fraction:
            raise ValueError("data.eval names the held-out files, so data.eval_fraction would hold out nothing more; "
                             "give one of them")
        train, held_out = ({Path(p).expanduser().resolve() for p in files} for files in (self.train, self.eval))
        both = train & held_out
        if both:  # held-out figures measured on what trained
            raise ValueError(f"data.eval names a training file too ({', '.join(sorted(str(p) for p in both))}): hold "
                             "out other records, or set data.eval_fraction to carve them from data.train")
        return self


class LoraSpec(_Strict):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    top_layers: int | None = Field(default=None, gt=0, description="adapt only the last N transformer layers: "
                                   "backpropagation then stops there, which on CPU saves most of a step")


class SamplingSpec(_Strict):
    """Rejection sampling (best-of-n): the prompts, how answers are drawn, which reward model ranks them."""

    reward_model: str = Field(description="registry name of a reward model (method rm)")
    prompts: Path = Field(description="JSON Lines with `prompt` or `messages` (a trailing assistant turn is dropped)")
    n: int = Field(default=4, ge=2, le=64)
    temperature: float = Field(default=1.0, gt=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=256, gt=0)
    limit: int | None = Field(default=None, ge=1, description="sample only the file's first N prompts")
    min_reward: float | None = Field(default=None, description="drop prompts whose best answer scores lower")
    server: str | None = Field(default=None, description="base URL of a running `zephyr serve`; default offline vLLM")
    keep_cut_off: bool = Field(default=False, description="rank answers cut off at max_tokens too (a smoke test's "
                               "tiny model never ends one); SFT would learn to stop mid-sentence")
    allow_uncleaned: bool = Field(default=False, description="sample from prompts written with --no-clean, or a raw "
                                  "review export's, that `zephyr data clean` never ran on (refused unless set), and "
                                  "train on what they become; as data.allow_uncleaned for other methods")
    seed: int = 0


class RewardsSpec(_Strict):
    """GRPO's rewards and their weights: verifiable ones (training/rewards.py) and, optionally, a reward model."""

    served_letter: float = Field(default=1.0, ge=0.0, description="the letter /mcq explain would serve (the policy "
                                 "reads it after the reasoning and the answer cue) is the key")
    correct_letter: float = Field(default=0.0, ge=0.0, description="the answer's own `Answer: X` line is the key")
    answer_format: float = Field(default=0.2, ge=0.0, description="reasoning, then an answer line with a letter")
    reward_model: str | None = Field(default=None, description="registry name of a reward model (method rm)")
    reward_model_weight: float = Field(default=0.5, ge=0.0)

    def weighted(self) -> list[tuple[str, float]]:
        """(reward name, weight) of every reward with a positive weight, the reward model last."""
        named = [("served_letter", self.served_letter), ("correct_letter", self.correct_letter),
                 ("answer_format", self.answer_format)]
        if self.reward_model:
            named.append((self.reward_model, self.reward_model_weight))
        return [(name, weight) for name, weight in named if weight > 0]


class Recipe(_Strict):
    method: Method
    model: str = DEFAULT_MODEL
    output: str | None = Field(default=None, description="registry name of the result; default <model>-<recipe>")
    description: str | None = None
    data: DataSpec | None = Field(default=None, description="required, except for rs (it samples its own)")
    lora: LoraSpec | None = Field(default_factory=LoraSpec, description="null trains every parameter")
    qlora: bool = Field(default=False, description="load the base in 4-bit nf4 (bitsandbytes; CUDA only)")
    trainer: dict[str, Any] = Field(default_factory=dict, description="arguments of TRL's <Method>Config")
    sampling: SamplingSpec | None = None
    rewards: RewardsSpec | None = Field(default=None, description="grpo: the rewards and their weights")

    @field_validator("output")
    @classmethod
    def _registry_name(cls, value: str | None) -> str | None:
        try:
            return None if value is None else check_name(value)
        except RegistryError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.method == "rs" and self.sampling is None:
            raise ValueError("method rs needs a `sampling` section (reward_model, prompts, n, ...)")
        if self.method != "rs" and self.sampling is not None:
            raise ValueError(f"`sampling` belongs to method rs, not {self.method}")
        if self.method != "rs" and self.data is None:
            raise ValueError(f"method {self.method} needs a `data` section with `train` files")
        if self.method == "rs" and self.data is not None:
            raise ValueError("method rs trains on the answers it samples: drop `data`, set `sampling.prompts`")
        if self.data is not None and self.data.balance_lengths and self.method not in ("rm", "dpo"):
            raise ValueError(f"data.balance_lengths needs preference pairs (method rm or dpo), not {self.method}")
        if self.data is not None and self.data.end_with_eos and self.method != "sft":
            raise ValueError(f"data.end_with_eos ends SFT completions, not {self.method} data")
        if self.method == "grpo":
            self.rewards = self.rewards or RewardsSpec()
            if not self.rewards.weighted():
                raise ValueError("rewards: every weight is 0; give at least one reward a positive weight")
            if "reward_weights" in self.trainer:
                raise ValueError("trainer.reward_weights is set from `rewards`; set the weights there")
        elif self.rewards is not None:
            raise ValueError(f"`rewards` belongs to method grpo, not {self.method}")
        if self.qlora and self.lora is None:
            raise ValueError("qlora trains a LoRA adapter on a 4-bit base: set `lora`, or drop `qlora`")
        reserved = RESERVED_TRAINER_KEYS & set(self.trainer)
        if reserved:
            raise ValueError(f"trainer.{sorted(reserved)[0]} is set by `zephyr train` itself; remove it")
        if "model_init_kwargs" in self.trainer:  # TRL only logs that it ignores them for a model given to it
            raise ValueError("trainer.model_init_kwargs would be ignored: `zephyr train` loads the model itself (in "
                             "float32, or in 4 bits with `qlora`); remove it")
        heldout_scored = self.data is not None and self.data.validation_fraction > 0 and (
            self.data.eval_fraction > 0 or self.data.eval)
        if (self.method in ("dpo", "kto") and self.lora is None and self.trainer.get("precompute_ref_log_probs")
                and heldout_scored):
            # TRL refuses to score a dataset after training starts when the reference is the (trained) policy itself
            raise ValueError(f"full fine-tuning {self.method} with trainer.precompute_ref_log_probs cannot score the "
                             "held-out part after training (the reference model is not kept): train a `lora` "
                             "adapter, drop precompute_ref_log_probs, or drop data.validation_fraction")
        uploads = sorted(key for key in self.trainer if key == "push_to_hub" or key.startswith("hub_"))
        if uploads:
            raise ValueError(f"trainer.{uploads[0]}: a run never uploads from `zephyr train` (its data may come from "
                             "students' chats); remove it, and publish a registry entry deliberately if you must")
        return self

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()

    def resolved(self) -> dict[str, Any]:
        # Fields added after recipes had run are left out at their defaults: the dump is what it was before they
        # existed, the digest of an unchanged recipe stays the same, and its run folder still resumes.
        dump = self.model_dump(mode="json")
        for section, field, default in LATER_FIELDS:
            holder = dump if section is None else dump.get(section)
            if isinstance(holder, dict) and holder.get(field, default) == default:
                holder.pop(field, None)
        return dump

    def output_name(self, recipe_path: Path | None = None) -> str:
        return self.output or f"{self.model}-{recipe_path.stem if recipe_path else self.method}"[:64].lower()


def config_class(method: str) -> type:
    """TRL's config dataclass for a method (rs fine-tunes on its best-of-n answers, so it is SFT's)."""
    import trl

    return {"sft": trl.SFTConfig, "rs": trl.SFTConfig, "dpo": trl.DPOConfig, "kto": trl.KTOConfig,
            "rm": trl.RewardConfig, "grpo": trl.GRPOConfig}[method]


def _scalar_kind(annotation: Any) -> tuple[type, bool] | None:
    """(float, int or bool; whether None is allowed) for a config field of that plain type, else None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0], True) if len(rest) == 1 and rest[0] in (float, int, bool) else None
    return (annotation, False) if annotation in (float, int, bool) else None


def check_trainer_keys(method: str, trainer: dict[str, Any]) -> None:
    """Every key is an argument of the method's TRL config, and numbers and switches have their type: TRL checks
    neither before the model has loaded."""
    config = config_class(method)
    fields = {f.name: f for f in dataclasses.fields(config)}
    try:
        hints = typing.get_type_hints(config)
    except Exception:  # noqa: BLE001 - an annotation this Python cannot resolve: check names only
        hints = {}
    for key, value in trainer.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"trainer.{key} is not an argument of TRL's {config.__name__}{hint}")
        kind = _scalar_kind(hints.get(key, fields[key].type))
        if kind is None or (value is None and kind[1]):
            continue
        expected, _ = kind
        if expected is bool and not isinstance(value, bool):
            raise RecipeError(f"trainer.{key} must be true or false, not {value!r}")
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise RecipeError(f"trainer.{key} must be a whole number, not {value!r}")
        if expected is float and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise RecipeError(f"trainer.{key} must be a number, not {value!r}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` pairs into a nested dict; values are YAML (`trainer.beta=0.2`, `lora=null`, `data.train=[a,b]`)."""
    nested: dict[str, Any] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {override!r} must look like key=value (for example trainer.beta=0.2)")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {override!r} sets inside {part!r}, which is not a section")
        try:
            node[parts[-1]] = _load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(f"override {override!r}: its value is not YAML ({str(exc).splitlines()[0]}); quote "
                              "a value that is meant as text") from None
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_recipe(path: Path, overrides: list[str] = (), method: str | None = None) -> Recipe:
    """Read, override and validate a recipe. Relative data paths are taken from the current folder."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist (recipes live in training/recipes/)")
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read the recipe {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} must hold a mapping of recipe keys, not {type(raw).__name__}")
    raw = _merge(raw, parse_overrides(list(overrides)))
    if method is not None:
        if raw.setdefault("method", method) != method:
            raise RecipeError(f"{path} is a {raw['method']} recipe; run it with `zephyr train {raw['method']}`")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "recipe"
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise RecipeError(f"{path}: {where}: {message}") from None
    check_trainer_keys(recipe.method, recipe.trainer)
    files = [*recipe.data.train, *recipe.data.eval] if recipe.data else []
    for file in files + ([recipe.sampling.prompts] if recipe.sampling else []):
        if not file.is_file():
            raise RecipeError(f"{path}: data file {file} does not exist (build it with `zephyr data ...`)")
    return recipe
