"""`zephyr eval` end to end on the real engine: every suite on small files this test writes, letter format in
process equal to the running server's /mcq answers, then the report and the gate over the stored results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evals.results import ResultStore
from loadtest.harness import linked_variant
from offline import benchmarks
from offline.engine import IN_PROCESS
from tests.integration.conftest import IN_PROCESS_ENGINE_ENV, STUDENT_KEY, run_check_script
from tests.integration.numerics import bf16_rounds_by_batch_shape
from zephyr.registry import Registry
from zephyr.settings import DEFAULT_MODEL

pytestmark = pytest.mark.integration

MCQ = [  # (question, options, key): easy science with known answers
    ("Which gas do plants take in from the air to make food?", ["Oxygen", "Carbon dioxide", "Helium", "Neon"], "B"),
    ("What is the boiling point of water at sea level in Celsius?", ["50", "100", "150", "0"], "B"),
    ("Which planet is closest to the Sun?", ["Mercury", "Venus", "Earth", "Mars"], "A"),
    ("What force pulls objects toward the Earth?", ["Magnetism", "Friction", "Gravity", "Tension"], "C"),
    ("Which part of the cell holds the DNA?", ["Cell wall", "Nucleus", "Vacuole", "Membrane"], "B"),
    ("Ice melting into water is an example of", ["a chemical change", "a phase change", "fusion", "decay"], "B"),
    ("Which organ pumps blood through the body?", ["Lungs", "Liver", "Heart", "Kidney"], "C"),
    ("What do we call animals that eat only plants?", ["Carnivores", "Omnivores", "Decomposers", "Herbivores"], "D"),
    ("A compass needle points toward the Earth's", ["magnetic north", "equator", "moon", "sun"], "A"),
    ("Which of these is a renewable energy source?", ["Coal", "Oil", "Wind", "Natural gas"], "C"),
]
GSM8K = [("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = <<3+4=7>>7\n#### 7"),
         ("A box holds 6 eggs. How many eggs are in 2 boxes?", "6 * 2 = <<6*2=12>>12\n#### 12"),
         ("Sara had 10 dollars and spent 4. How many dollars are left?", "10 - 4 = <<10-4=6>>6\n#### 6")]


# Log-likelihoods of options sharing long leading text, after contexts of many lengths, scored through the
# prefix-cached path (evals/engine.py) and again by plain vLLM requests that compute every position.
CLOZE_CACHE_CHECK = """
import json, os, sys
from pathlib import Path
from vllm import SamplingParams, TokensPrompt
from offline.engine import OfflineEngine
from zephyr.settings import Settings


def main():
    engine = OfflineEngine(Path(sys.argv[1]), Settings())
    tok = engine.tokenizer
    preamble = "Plants, animals and the rocks beneath them are studied by scientists in many fields. "
    options = [" the process by which green plants make food from light and water",
               " the process by which green plants make food from light and air",
               " the process by which animals digest food", " a kind of rock"]
    requests = []
    for k in range(24):
        context = tok.encode(preamble * (1 + k // 8) + "filler " * k + "Question: What is photosynthesis?\\nAnswer:")
        requests += [(None, context, tok.encode(option)) for option in options]
    # Contexts that end on a KV-block boundary: their options' hits cover the whole context.
    filler = tok.encode(" filler")
    for repeat in (2, 3):
        base = tok.encode(preamble * repeat + "Question: What is photosynthesis?\\nAnswer:")
        context = filler * ((-len(base)) % engine.settings.block_size) + base
        requests += [(None, context, tok.encode(option)) for option in options]
    cached = engine.lm_eval_model._loglikelihood_tokens(requests)
    plain = engine.llm.generate([TokensPrompt(prompt_token_ids=c + o) for _, c, o in requests],
                                SamplingParams(prompt_logprobs=1, max_tokens=1, detokenize=False), use_tqdm=False)
    plain_scores = [sum(out.prompt_logprobs[i][(c + o)[i]].logprob for i in range(len(c), len(c) + len(o)))
                    for out, (_, c, o) in zip(plain, requests, strict=True)]
    print("RESULT " + json.dumps({"cached": [score for score, _ in cached], "plain": plain_scores,
                                  "stats": engine.lm_eval_model.prefix_stats}))
    engine.shutdown()
    # Leave as `zephyr eval` does (cli/evaluate.py: _exit_after_engine): Arrow's thread pool, started when lm-eval
    # reads its task files, can abort interpreter teardown with SIGABRT after every result is out (seen 2026-12-02).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
"""

# Greedy chat answers to 300 word problems, more than the engine runs at once. With vLLM's core in its own process,
# 193 of these 300 answers differed between two runs here (2026-12-03); offline/engine.py keeps it in process.
GREEDY_RERUN = """
import json, os, sys
from pathlib import Path
from offline.engine import OfflineEngine
from zephyr.settings import Settings


def main():
    engine = OfflineEngine(Path(sys.argv[1]), Settings())
    names = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
    things = ["apples", "marbles", "stickers", "books", "seeds", "coins", "shells", "pencils", "cards", "eggs"]
    prompts = [[{"role": "user", "content": (
        f"{name} has {3 + n} boxes of {thing}. Each box holds {4 + (n * 7) % 11} {thing}. {name} gives away "
        f"{2 + n % 5} {thing} to each of {1 + n % 4} friends, then buys {5 + (n * 3) % 9} more boxes. "
        f"How many {thing} does {name} have now? Explain each step.")}]
        for k, name in enumerate(names) for j, thing in enumerate(things) for n in [(3 * k + j) % 7]]
    answers = engine.chat(prompts, 128, "rerun")
    print("RESULT " + json.dumps({"answers": answers, "engine": engine.engine_info}))
    engine.shutdown()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
"""


def write_data(root: Path) -> Path:
    arc = root / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl"
    arc.parent.mkdir(parents=True)
    arc.write_text("".join(json.dumps({"id": f"mcq-{i}", "answerKey": key, "question": {
        "stem": q, "choices": [{"label": "ABCD"[n], "text": o} for n, o in enumerate(options)]}}) + "\n"
        for i, (q, options, key) in enumerate(MCQ)))
    (root / "gsm8k").mkdir()
    lines = "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GSM8K)
    (root / "gsm8k" / "test.jsonl").write_text(lines)
    (root / "gsm8k" / "train.jsonl").write_text(lines * 2)
    (root / "sciq").mkdir()
    (root / "sciq" / "test.json").write_text(json.dumps([
        {"question": "What gas do plants release during photosynthesis?", "correct_answer": "oxygen",
         "distractor1": "nitrogen", "distractor2": "argon", "distractor3": "helium",
         "support": "During photosynthesis, plants use light to turn carbon dioxide and water into sugar and oxygen."},
        {"question": "What is the center of an atom called?", "correct_answer": "nucleus", "distractor1": "shell",
         "distractor2": "orbit", "distractor3": "cloud",
         "support": "The nucleus is the small, dense center of an atom, made of protons and neutrons."}]))
    return root


def private_home(home: Path, default_model, **manifest) -> Path:
    """A registry whose default model links each weight file but owns its manifest, so recording results here
    never touches the user's registry."""
    linked_variant(home, default_model, DEFAULT_MODEL, **manifest)
    return home


def zephyr(*args: str, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_eval_all_suites_server_equality_report_and_gate(tmp_path, server, default_model):
    home = private_home(tmp_path / "home", default_model)
    env = {**os.environ, "ZEPHYR_HOME": str(home), "ZEPHYR_DATA_DIR": str(write_data(tmp_path / "data")),
           **IN_PROCESS_ENGINE_ENV}
    run = zephyr("eval", "run", "--model", DEFAULT_MODEL, "--suite", "all", "--benchmarks", "arc_easy",
                 "--server", server.url, "--api-key", STUDENT_KEY, "--gsm8k-max-tokens", "48", env=env)
    assert run.returncode == 0, run.stderr[-3000:]

    latest = ResultStore(home / "eval-results").latest(DEFAULT_MODEL)
    assert {m.key for m in latest.measurements} >= {
        "arc_easy/letter_acc", "arc_easy/letter_acc_server", "arc_easy/cloze_acc", "arc_easy/cloze_acc_norm",
        "gsm8k/exact_match_0shot_cot", "gsm8k/exact_match_5shot", "sciq_text/bertscore_f1", "gsm8k_text/bertscore_f1",
        "sciq_text/looping", "gsm8k_text/looping", "sciq_text/answer_words", "gsm8k_text/answer_words",
        "sciq_text/names_key", "sciq_text/names_distractor"}
    local, served = latest.get("arc_easy/letter_acc"), latest.get("arc_easy/letter_acc_server")
    assert local.n == served.n == len(MCQ)
    # The number measured offline is the number the service delivers: the same letter for every question.
    assert served.details["answers"] == local.details["answers"]
    assert served.score == local.score
    assert set(latest.get("gsm8k/exact_match_5shot").items) == {f"gsm8k-test-{i}" for i in range(len(GSM8K))}
    # What each figure was computed on, by content: the gate pairs only measurements of the same questions.
    assert set(latest.data) == {"arc_easy", "gsm8k", "gsm8k:train", "sciq"}
    assert latest.get("arc_easy/cloze_acc").data_digest == {"arc_easy": benchmarks.fingerprint(
        benchmarks.load("arc_easy", data_dir=Path(env["ZEPHYR_DATA_DIR"])))}
    assert set(latest.get("gsm8k/exact_match_5shot").data_digest) == {"gsm8k", "gsm8k:train"}
    assert set(latest.get("sciq_text/looping").data_digest) == {"sciq"}
    assert 0 < latest.get("sciq_text/bertscore_f1").score <= 1
    assert "dialogrpt_updown" in latest.get("sciq_text/bertscore_f1").details["skipped"]
    for benchmark in ("sciq_text", "gsm8k_text"):  # each answer's length, read from the answers themselves
        samples = latest.get(f"{benchmark}/bertscore_f1").details["samples"]
        words = latest.get(f"{benchmark}/answer_words").items
        assert samples and {i: words[i] for i in samples} == {i: len(text.split()) for i, text in samples.items()}
    # Whether each chat answer names the key or a distractor, read from the answers and the SciQ options.
    sciq = {item.id: item for item in benchmarks.load("sciq", data_dir=Path(env["ZEPHYR_DATA_DIR"]))}
    samples = latest.get("sciq_text/bertscore_f1").details["samples"]
    for metric, verdict in (("names_key", "right"), ("names_distractor", "wrong")):
        named = latest.get(f"sciq_text/{metric}").items
        assert {i: named[i] for i in samples} == {i: float(benchmarks.answer_verdict(
            text, sciq[i].options, "ABCD".index(sciq[i].answer)) == verdict) for i, text in samples.items()}
    manifest = Registry(home / "models").get(DEFAULT_MODEL).manifest
    assert manifest.evals["arc_easy/letter_acc"]["score"] == pytest.approx(local.score)
    assert default_model.manifest.evals.get("arc_easy/letter_acc", {}).get("run", "") != \
        manifest.evals["arc_easy/letter_acc"]["run"]  # the user's registry is untouched

    report = zephyr("eval", "report", "--models", DEFAULT_MODEL, "--out", str(tmp_path / "report"), env=env)
    assert report.returncode == 0, report.stderr[-2000:]
    html = (tmp_path / "report" / "report.html").read_text()
    assert f"{local.score:.1%}".removesuffix("%") in html and "data:image/png;base64" in html

    # A model against itself passes anything (every delta 0): refused, naming why. (test_review_ab.py gates two
    # models through the same command, passing and failing.)
    gate = zephyr("eval", "gate", "--candidate", DEFAULT_MODEL, "--baseline", DEFAULT_MODEL, "--min-items", "1",
                  env=env)
    assert gate.returncode == 1 and "the candidate and the baseline are both" in " ".join(gate.stderr.split())


def test_explain_format_in_process_equals_the_servers(tmp_path, server, default_model):
    """`--explain` scores letters as POST /mcq with "explain": true answers them: greedy reasoning, the answer
    cue, then the constrained letter; the server gives the same letter for every question."""
    home = private_home(tmp_path / "home", default_model)
    env = {**os.environ, "ZEPHYR_HOME": str(home), "ZEPHYR_DATA_DIR": str(write_data(tmp_path / "data")),
           **IN_PROCESS_ENGINE_ENV}
    run = zephyr("eval", "run", "--model", DEFAULT_MODEL, "--suite", "mcq", "--benchmarks", "arc_easy", "--explain",
                 "--no-cloze", "--server", server.url, "--api-key", STUDENT_KEY, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    latest = ResultStore(home / "eval-results").latest(DEFAULT_MODEL)
    assert "arc_easy/letter_acc" not in {m.key for m in latest.measurements}  # the direct format was not asked
    local, served = latest.get("arc_easy/letter_acc_explain"), latest.get("arc_easy/letter_acc_explain_server")
    assert local.n == served.n == len(MCQ)
    explanations = local.details["explanations"]
    assert len(explanations) == len(MCQ) and all(text and "Answer:" not in text for text in explanations.values())
    if bf16_rounds_by_batch_shape():
        # Greedy reasoning in bf16 on AMX may take another word where two are near-tied in one batch shape and not in
        # the other (tests/integration/numerics.py), and the letter after it may follow: measured 1 of 10 here.
        assert served.details["same_answer_as_local"] >= len(MCQ) - 2, (served.details, local.details["answers"])
    else:
        assert served.details["answers"] == local.details["answers"]
        assert served.details["same_answer_as_local"] == len(MCQ)


def test_cloze_through_the_prefix_cache_equals_scoring_every_position(tmp_path, default_model):
    env = {}
    if bf16_rounds_by_batch_shape():
        # the rule decides which positions come from where, whatever the dtype; bf16 on AMX rounds by batch
        # shape, so only fp32 can show the equality exactly here (tests/integration/numerics.py)
        env["ZEPHYR_DTYPE"] = "float32"
    result = run_check_script(tmp_path / "cloze_cache_check.py", CLOZE_CACHE_CHECK, default_model.path, env)
    stats = result["stats"]
    assert stats["cached_tokens"] > 0  # the options reused their context's blocks
    assert stats["rescored"] > 0  # and some hits reached into an option's shared leading words
    assert stats["first_token"] > 0 and stats["context_requests"] > 0  # others covered exactly the context
    assert result["cached"] == pytest.approx(result["plain"], abs=1e-4)


def test_greedy_answers_are_the_same_in_a_rerun(tmp_path, default_model):
    """The text suite's figures (looping, answer length) are compared between runs by the gate, so a rerun of the
    same engine on the same prompts must give the same answers (offline/engine.py keeps the core in process)."""
    results = [run_check_script(tmp_path / "greedy_rerun.py", GREEDY_RERUN, default_model.path) for _ in range(2)]
    first, second = (result["answers"] for result in results)
    # 100 answers: before the core stayed in process, 193 of 300 such answers differed between identical runs.
    assert len(first) == 100 and all(first)
    assert [i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b] == []
    assert results[0]["engine"]["engine_core"] == IN_PROCESS
