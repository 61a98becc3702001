"""The alignment loop on the real engine, through the `zephyr` command: vLLM samples verifiable science pairs from
a tiny Llama, DPO trains on them, the merged result loads in vLLM and answers (letters and free text), a reward
model trains, and rejection sampling draws best-of-n answers with vLLM and fine-tunes on them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit.tiny_llama import TINY, make_tiny_llama
from zephyr.prompts import with_system_prompt
from zephyr.registry import Registry
from zephyr.schemas import KTOExample, PreferencePair, read_jsonl
from zephyr.settings import DEFAULT_SYSTEM_PROMPT

pytestmark = pytest.mark.integration

QUESTIONS = [  # (stem, options, key) in ARC's file format below
    ("Which gas do plants take in to make food?", ["oxygen", "carbon dioxide", "helium", "neon"], "B"),
    ("Which planet is closest to the Sun?", ["Mercury", "Venus", "Earth", "Mars"], "A"),
    ("What force pulls objects toward the Earth?", ["magnetism", "friction", "gravity", "tension"], "C"),
    ("Which organ pumps blood through the body?", ["lungs", "liver", "kidney", "heart"], "D"),
    ("Which of these is a renewable energy source?", ["coal", "oil", "wind", "natural gas"], "C"),
    ("What do we call animals that eat only plants?", ["carnivores", "herbivores", "decomposers", "fungi"], "B"),
]


def write_arc(folder: Path, split: str, stem_prefix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"{split}-{i}", "answerKey": key, "question": {
        "stem": stem_prefix + stem, "choices": [{"label": "ABCD"[j], "text": t} for j, t in enumerate(options)]}})
        for i, (stem, options, key) in enumerate(QUESTIONS)]
    name = {"train": "Train", "test": "Test", "validation": "Dev"}[split]
    (folder / f"ARC-Easy-{name}.jsonl").write_text("\n".join(lines) + "\n")


def zephyr(*args: str, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"zephyr {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_science_pairs_dpo_serve_rm_and_rejection_sampling(tmp_path, default_model):
    home = tmp_path / "home"
    make_tiny_llama(Registry(home / "models"), default_model)
    data_dir = tmp_path / "data"
    for split in ("train", "test"):
        write_arc(data_dir / "arc" / "ARC-Easy", split)
    env = {**os.environ, "ZEPHYR_HOME": str(home), "ZEPHYR_DATA_DIR": str(data_dir),
           "ZEPHYR_EVAL_RESULTS_DIR": str(tmp_path / "results"), "ZEPHYR_ENFORCE_EAGER": "true"}
    pairs, kto = tmp_path / "pairs.jsonl", tmp_path / "kto.jsonl"

    # 1. Verifiable pairs from the tiny model in vLLM. The test split holds the same questions: without
    #    decontamination they are kept, and cleaning them against the evaluation sets (the same step `data science`
    #    runs unless told not to, without sampling again) drops them all.
    zephyr("data", "science", "--model", TINY, "--sources", "arc_easy:train", "--k", "2", "--max-tokens", "16",
           "--out", str(pairs), "--kto-out", str(kto), "--no-decontaminate", env=env)
    records = list(read_jsonl(pairs, PreferencePair))
    direct = [r for r in records if r.meta["format"] == "direct"]
    assert len(direct) == len(QUESTIONS)
    assert all(r.chosen[0].content == r.meta["key"] != r.rejected[0].content for r in direct)
    assert {r.meta["format"] for r in read_jsonl(kto, KTOExample)} >= {"direct"}
    dropped = zephyr("data", "clean", "--input", str(pairs), "--format", "dpo", "--out", str(tmp_path / "clean.jsonl"),
                     "--against", "arc_easy", env=env)
    assert "arc_easy" in dropped.stdout and "wrote 0 PreferencePair records" in dropped.stdout

    #    Chat answers to the bare questions, sampled in vLLM as a student's chat is rendered; "Which of these ..."
    #    needs its options and is not asked. A tiny random model names no option, so no pair is written.
    answers = tmp_path / "chat-answers.jsonl"
    chat = zephyr("data", "chat-answers", "--model", TINY, "--sources", "arc_easy:train", "--k", "2", "--max-tokens",
                  "16", "--out", str(tmp_path / "chat.jsonl"), "--no-decontaminate", "--answers-out", str(answers),
                  env=env)
    rows = dict(re.findall(r"│\s*([a-z][^│]*?)\s*│\s*([^│]*?)\s*│", chat.stdout))
    assert rows["left out (the stem points at options or a figure)"] == "1", chat.stdout
    assert rows["answers sampled"] == str((len(QUESTIONS) - 1) * 2), chat.stdout
    assert "wrote 0 PreferencePair records" in chat.stdout
    # The answers kept rebuild the pairs under another rule, without sampling.
    assert len(answers.read_text().splitlines()) == (len(QUESTIONS) - 1) * 2
    rebuilt = zephyr("data", "chat-answers", "--model", TINY, "--sources", "arc_easy:train", "--answers-from",
                     str(answers), "--rejected", "wrong-or-swapped", "--out", str(tmp_path / "swaps.jsonl"),
                     "--no-decontaminate", env=env)
    said = " ".join(rebuilt.stdout.split())
    assert f"answers to {len(QUESTIONS) - 1} of {len(QUESTIONS) - 1} questions read" in said, rebuilt.stdout
    assert dict(re.findall(r"│\s*([a-z][^│]*?)\s*│\s*([^│]*?)\s*│", rebuilt.stdout)) == rows, rebuilt.stdout

    # 2. DPO on them; the merged checkpoint loads in vLLM and answers MCQs and free-text questions.
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump({"method": "dpo", "model": TINY, "output": "tiny-dpo",
                                      "data": {"train": str(pairs)}, "lora": {"r": 4, "alpha": 8},
                                      "trainer": {"max_steps": 2, "per_device_train_batch_size": 2,
                                                  "max_length": 256, "beta": 0.1}}))
    trained = zephyr("train", "dpo", "--recipe", str(recipe), env=env)
    assert "registered tiny-dpo" in trained.stdout
    entry = Registry(home / "models").get("tiny-dpo")
    assert entry.manifest.parent == TINY and entry.manifest.method == "dpo"
    zephyr("eval", "run", "--model", "tiny-dpo", "--suite", "mcq", "--benchmarks", "arc_easy", "--no-cloze", env=env)
    write_gsm8k(data_dir / "gsm8k")
    zephyr("eval", "run", "--model", "tiny-dpo", "--suite", "gsm8k", "--limit", "1", "--gsm8k-max-tokens", "16",
           env=env)
    shown = zephyr("eval", "show", "--model", "tiny-dpo", env=env).stdout
    assert "letter_acc" in shown and "exact_match" in shown

    # 3. A reward model on the pairs, then best-of-n sampling ranked by it and SFT on the winners.
    rm_recipe = tmp_path / "rm.yaml"
    rm_recipe.write_text(yaml.safe_dump({"method": "rm", "model": TINY, "output": "tiny-rm",
                                         "data": {"train": str(pairs), "eval_fraction": 0.2},
                                         "lora": {"r": 4, "alpha": 8},
                                         "trainer": {"max_steps": 2, "per_device_train_batch_size": 2,
                                                     "max_length": 256}}))
    zephyr("train", "rm", "--recipe", str(rm_recipe), env=env)
    rs_recipe = tmp_path / "rs.yaml"
    rs_recipe.write_text(yaml.safe_dump({"method": "rs", "model": TINY, "output": "tiny-rs",
                                         "sampling": {"reward_model": "tiny-rm", "prompts": str(pairs), "n": 3,
                                                      "max_tokens": 16, "limit": len(records) - 1,
                                                      "keep_cut_off": True},  # a random tiny model never stops
                                         "lora": {"r": 4, "alpha": 8},
                                         "trainer": {"max_steps": 1, "per_device_train_batch_size": 2,
                                                     "max_length": 256}}))
    zephyr("train", "rs", "--recipe", str(rs_recipe), env=env)
    rs_entry = Registry(home / "models").get("tiny-rs")
    assert rs_entry.manifest.method == "rs" and rs_entry.manifest.parent == TINY
    kept = [json.loads(line) for line in (home / "runs" / "tiny-rs" / "rs-data.jsonl").read_text().splitlines()]
    assert len(kept) == len(records) - 1 and all(row["meta"]["n"] >= 1 for row in kept)  # the first N prompts
    # each prompt as the service shows it to the model: the tutor's system prompt first where it has none (these
    # MCQ prompts carry the MCQ system prompt, so they stay as they are)
    assert [row["messages"][:-1] for row in kept] == [
        with_system_prompt([m.model_dump() for m in r.prompt], DEFAULT_SYSTEM_PROMPT) for r in records[:-1]]
    assert all(row["meta"]["reward"] >= row["meta"]["reward_mean"] for row in kept)  # the best, not a random one
    # A rerun with other trainer settings reuses the ranked samples (that other sampling settings sample again is
    # test_train_methods' unit test of the same provenance check).
    data_file = home / "runs" / "tiny-rs" / "rs-data.jsonl"
    before = data_file.read_bytes()
    rerun = zephyr("train", "rs", "--recipe", str(rs_recipe), "--overwrite", "trainer.learning_rate=0.00005", env=env)
    said = " ".join((rerun.stdout + rerun.stderr).split())  # the progress console writes to stderr and wraps
    assert "reusing the ranked samples" in said and data_file.read_bytes() == before


def write_gsm8k(folder: Path) -> None:
    """Train (the 5-shot examples) and test splits in the original format."""
    folder.mkdir(parents=True, exist_ok=True)
    row = json.dumps({"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"})
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text((row + "\n") * 5)
