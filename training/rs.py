"""Rejection sampling (best-of-n), the simplest way to train on a reward model's judgement: draw n answers per
prompt from vLLM (offline, or a running `zephyr serve` through the OpenAI client), keep the reward model's best,
write them as SFT data beside the run, and fine-tune on them. The result is a registry entry with method `rs`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from training.data.clean import CLEANED_KEY, cleaning_of
from training.recipes import Recipe, RecipeError, SamplingSpec
from training.run import (
    RunResult,
    TrainingError,
    check_output_free,
    holds_training,
    saved_recipe_digest,
    train,
    trainable_base,
)
from zephyr.console import make_console
from zephyr.paths import private_dir
from zephyr.prompts import with_system_prompt
from zephyr.registry import Registry, RegistryError, check_name, digest_file
from zephyr.schemas import Message, SFTExample, write_jsonl
from zephyr.settings import Settings

Conversation = list[dict[str, str]]
SAMPLES_FILE, PROVENANCE_FILE = "rs-data.jsonl", "rs-sampling.json"  # in the run folder
# What a sampler gives for an answer cut off at max_tokens: it is never ranked, so SFT never learns to end an
# answer mid-sentence (the chat template closes every trained answer with its end-of-turn token).
CUT_OFF = None


def read_prompts_and_stamps(path: Path) -> tuple[list[Conversation], list[Any]]:
    """Prompts from JSON Lines holding `prompt` (messages) or `messages` (a trailing assistant turn is dropped), and
    each record's cleaning stamp (`meta.cleaned`, None without one, False for a raw review export's): an example
    made from a prompt carries its prompt's stamp (the answer is the model's own), so `zephyr train` judges it."""
    prompts: list[Conversation] = []
    stamps: list[Any] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read the prompts file {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            messages = record.get("prompt") or record.get("messages")
            messages = [Message.model_validate(m).model_dump() for m in messages]
        except (ValueError, TypeError, AttributeError) as exc:
            raise RecipeError(f"{path}:{number}: needs `prompt` or `messages` as a list of chat messages ({exc})") \
                from None
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise RecipeError(f"{path}:{number}: the prompt must end with a user message")
        prompts.append(messages)
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        stamps.append(False if cleaning_of(meta) == "never_cleaned" else meta.get(CLEANED_KEY))
    if not prompts:
        raise RecipeError(f"{path} holds no prompts")
    return prompts, stamps


def sample_offline(model_path: Path, prompts: list[Conversation], spec: SamplingSpec,
                   settings: Settings) -> list[list[str | None]]:
    from vllm import SamplingParams, TokensPrompt

    from offline.engine import OfflineEngine
    from zephyr.prompts import encode_chat

    engine = OfflineEngine(model_path, settings.model_copy(update={"seed": spec.seed}))
    try:
        encoded = [TokensPrompt(prompt_token_ids=encode_chat(engine.tokenizer, p)) for p in prompts]
        params = SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens)
        return [[c.text if c.finish_reason == "stop" or spec.keep_cut_off else CUT_OFF for c in o.outputs]
                for o in engine.llm.generate(encoded, params, use_tqdm=True)]
    finally:
        engine.shutdown()


def sample_server(url: str, model: str, prompts: list[Conversation], spec: SamplingSpec,
                  api_key: str | None) -> list[list[str | None]]:
    from openai import APIError, OpenAI
    from tqdm import tqdm

    root = url.rstrip("/").removesuffix("/v1")  # the server's root, or its /v1 as OpenAI clients are given it
    answers = []
    with OpenAI(base_url=f"{root}/v1", api_key=api_key or "none", max_retries=3) as client:
        for prompt in tqdm(prompts, desc=f"sampling from {url}"):
            try:
                reply = client.chat.completions.create(model=model, messages=prompt, n=spec.n,
                                                       temperature=spec.temperature, top_p=spec.top_p,
                                                       max_tokens=spec.max_tokens, seed=spec.seed)
            except APIError as exc:  # unreachable, another model served (404), a key refused (401), rate-limited
                raise TrainingError(f"sampling.server {url} failed on prompt {len(answers) + 1} of {len(prompts)} "
                                    f"({type(exc).__name__}: {exc}); it must serve {model!r} (OpenAI-compatible), "
                                    "with ZEPHYR_API_KEY set to a key it accepts") from None
            answers.append([(choice.message.content or "") if choice.finish_reason == "stop" or spec.keep_cut_off
                            else CUT_OFF for choice in reply.choices])
    return answers


def best_of_n(prompts: list[Conversation], answers: list[list[str | None]], scorer: Any,
              min_reward: float | None, stamps: list[Any] | None = None) -> tuple[list[SFTExample], dict[str, float]]:
    """The reward model's best whole answer per prompt as SFT examples, with the score spread kept as provenance
    and the prompt's cleaning stamp (`stamps`, one a prompt). Answers cut off at max_tokens (CUT_OFF) and empty ones
    are not ranked."""
    # Every whole, non-empty answer, remembered with the prompt it answers; the reward model scores them at once.
    scored = [(owner, prompt + [{"role": "assistant", "content": a}])
              for owner, (prompt, group) in enumerate(zip(prompts, answers, strict=True)) for a in group
              if a is not CUT_OFF and a.strip()]
    scores = scorer.score([conversation for _, conversation in scored]) if scored else []
    by_prompt: dict[int, list[tuple[float, list[dict[str, str]]]]] = {}
    for (owner, conversation), score in zip(scored, scores, strict=True):
        by_prompt.setdefault(owner, []).append((score, conversation))
    examples, kept_scores = [], []
    for owner, candidates in sorted(by_prompt.items()):
        score, conversation = max(candidates, key=lambda c: c[0])  # ties: the first drawn
        if min_reward is not None and score < min_reward:
            continue
        stamp = stamps[owner] if stamps is not None else None
        examples.append(SFTExample(messages=[Message(**m) for m in conversation],
                                   meta={"reward": round(score, 4), "n": len(candidates),
                                         "reward_mean": round(sum(c[0] for c in candidates) / len(candidates), 4),
                                         **({CLEANED_KEY: stamp} if stamp is not None else {})}))
        kept_scores.append(score)
    stats = {"prompts": len(prompts), "kept": len(examples),
             "answers_cut_off": sum(a is CUT_OFF for group in answers for a in group),
             "best_reward_mean": sum(kept_scores) / len(kept_scores) if kept_scores else float("nan"),
             "all_reward_mean": sum(scores) / len(scores) if scores else float("nan")}
    return examples, stats


def run_rejection_sampling(recipe: Recipe, settings: Settings, *, recipe_path: Path | None = None, fresh: bool = False,
                           overwrite: bool = False, console: Console | None = None) -> RunResult:
    console = console or make_console()
    spec = recipe.sampling
    assert spec is not None  # the recipe validator guarantees it for method rs
    registry = Registry(settings.models_dir)
    base = trainable_base(registry, recipe.model)
    try:
        reward_entry = registry.get(spec.reward_model)
    except RegistryError as exc:
        raise RecipeError(f"sampling.reward_model: {exc}") from None
    if reward_entry.manifest.method != "rm":
        raise RecipeError(f"sampling.reward_model {spec.reward_model!r} is a {reward_entry.manifest.method} model, "
                          "not a reward model (train one with `zephyr train rm`)")
    output = check_name(recipe.output_name(recipe_path))  # names the run folder: checked before it is touched
    check_output_free(registry, output, overwrite, recipe.model)  # before sampling, not after it
    # The prompts as the service would show them to the model (its system prompt first), so the winners are
    # answers to served chats and are trained on in that form. A bad prompts file fails before anything is touched.
    prompts, stamps = read_prompts_and_stamps(spec.prompts)
    prompts = [with_system_prompt(p, settings.served_system_prompt) for p in prompts[:spec.limit]]
    stamps = stamps[:spec.limit]
    fitting = _fitting(prompts, base.path, spec.max_tokens, recipe.trainer.get("max_length", 1024))
    too_long = len(prompts) - len(fitting)
    prompts, stamps = [prompts[i] for i in fitting], [stamps[i] for i in fitting]
    # refused before the sampling's minutes, not when the SFT reads what they became
    if (never := sum(stamp is False for stamp in stamps)) and not spec.allow_uncleaned:
        raise RecipeError(f"{spec.prompts}: {never} prompts were never cleaned (written with --no-clean, or a review "
                          "export's): run `zephyr data clean` (a review export: `zephyr data review`) on it and "
                          "sample from what it writes, or set sampling.allow_uncleaned: true")
    if too_long:
        console.print(f"left out {too_long} prompts with no room for a {spec.max_tokens}-token answer within "
                      "trainer.max_length (SFT would cut the answer it learns from)")
    if not prompts:
        raise RecipeError("every prompt is longer than trainer.max_length allows with sampling.max_tokens; raise "
                          "max_length or lower max_tokens")
    data_dir = settings.home / "runs" / output
    if fresh:
        shutil.rmtree(data_dir, ignore_errors=True)
    data_file, provenance_file = data_dir / SAMPLES_FILE, data_dir / PROVENANCE_FILE
    provenance = {"model": base.name, "model_created_at": base.manifest.created_at.isoformat(),
                  "reward_model": reward_entry.name,
                  "reward_model_created_at": reward_entry.manifest.created_at.isoformat(),
                  "prompts_digest": digest_file(spec.prompts), "sampling": spec.model_dump(mode="json"),
                  "system_prompt": settings.served_system_prompt, "prompts_kept": len(prompts),
                  # samples from before examples carried their prompt's cleaning stamp are not reused
                  "cleaning_stamps": True}
    stats = _reusable_stats(data_file, provenance_file, provenance)
    if stats is not None:
        console.print(f"reusing the ranked samples in {data_file} (the same prompts, sampling, model and reward "
                      "model; --fresh samples again)")
        if saved_recipe_digest(data_dir) not in (None, recipe.digest()):
            _discard_training_state(data_dir)  # other trainer settings: the samples stay, the SFT starts over
    else:
        if _holds_work(data_dir):  # as train() refuses another recipe's folder: nothing is deleted unasked
            raise TrainingError(f"{data_dir} holds samples or a run made with other sampling, prompts, model or "
                                "reward model; pass --fresh to sample again and start over, or set another `output`")
        _discard_training_state(data_dir)  # e.g. the recipe.json of an attempt refused before it trained
        console.print(f"[bold]rs[/] {len(prompts)} prompts x {spec.n} answers from {spec.server or base.name}, "
                      f"ranked by {reward_entry.name}")
        if spec.server:
            answers = sample_server(spec.server, base.name, prompts, spec, os.environ.get("ZEPHYR_API_KEY"))
        else:
            answers = sample_offline(base.path, prompts, spec, settings)

        from offline.reward import RewardModel

        examples, stats = best_of_n(prompts, answers, RewardModel.load(reward_entry.path), spec.min_reward, stamps)
        if not examples:
            raise TrainingError(f"no prompt kept an answer (min_reward {spec.min_reward}); lower it or sample more")
        private_dir(data_dir)  # the prompts may be students' (a review export)
        provenance_file.unlink(missing_ok=True)  # until the new samples are all written
        write_jsonl(data_file, examples, private=True)
        # Written last: a crash in SFT (or a change to its trainer settings) reuses these ~20 minutes of sampling.
        provenance_file.write_text(json.dumps(provenance | {"stats": stats}, indent=2))
    console.print(f"kept {stats['kept']} of {stats['prompts']} prompts; mean reward of the kept answers "
                  f"{stats['best_reward_mean']:.3f} against {stats['all_reward_mean']:.3f} for all; "
                  f"data in {data_file}")
    result = train(recipe, settings, recipe_path=recipe_path, overwrite=overwrite, console=console,
                   data_files=[data_file])
    result.metrics |= {f"rs_{k}": v for k, v in stats.items()}
    return result


def _fitting(prompts: list[Conversation], model_path: Path, max_tokens: int, max_length: int | None) -> list[int]:
    """The positions of the prompts whose tokens leave room for a whole answer within SFT's max_length."""
    if not max_length:
        return list(range(len(prompts)))
    from transformers import AutoTokenizer

    from zephyr.prompts import encode_chat

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return [i for i, p in enumerate(prompts) if len(encode_chat(tokenizer, p)) + max_tokens + 1 <= max_length]


def _reusable_stats(data_file: Path, provenance_file: Path, provenance: dict[str, Any]) -> dict[str, float] | None:
    """The stats of ranked samples an earlier run left, if they came from exactly this sampling; else None."""
    if not data_file.is_file() or not provenance_file.is_file():
        return None
    try:
        saved = json.loads(provenance_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(saved, dict) or {k: saved.get(k) for k in provenance} != provenance:
        return None
    return saved.get("stats")


def _holds_work(run_dir: Path) -> bool:
    """Ranked samples, a checkpoint or a trained model: what a rerun must not delete without --fresh."""
    return (run_dir / SAMPLES_FILE).is_file() or holds_training(run_dir)


def _discard_training_state(run_dir: Path) -> None:
    """Everything in the run folder but the ranked samples and their provenance."""
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        if path.name in (SAMPLES_FILE, PROVENANCE_FILE):
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
