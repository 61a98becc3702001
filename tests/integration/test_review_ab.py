"""The product's loop on CPU, real parts throughout: two real servers (`zephyr serve` of the served model, whose
review candidates come from a second `zephyr serve` of the candidate model), blind pairs judged through the review
API, the export, `zephyr eval gate --reviews` passing and failing on those verdicts; then the verdicts cleaned into
preference pairs, DPO on them, the trained model quantized (W8A8, llm-compressor), served, and gated against the
served model through both servers' /mcq."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app as cli
from evals.results import EvalRun, ResultStore, measurement
from loadtest.harness import REVIEWER_KEYS, STUDENT_KEY, LocalServer, ServerFailed, linked_home, linked_variant
from tests.integration.test_training import zephyr  # in a subprocess: it loads models
from zephyr.registry import Registry
from zephyr.settings import DEFAULT_MODEL, Settings

pytestmark = pytest.mark.integration
CANDIDATE = "smollm2-135m-candidate"  # the default model's weights under a name of its own: a real second model
QUESTIONS = ["Why is the sky blue?", "What is photosynthesis?", "Why do magnets attract iron?",
             "What causes the tides?", "How do vaccines work?", "Why does ice float on water?"]
REVIEWER = REVIEWER_KEYS[0]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, default_model):
    """The candidate's server first (the served one calls it), each with a small KV cache: the session's own test
    server may be running too."""
    started: list[LocalServer] = []
    try:
        cand_home = linked_home(tmp_path_factory.mktemp("candidate-home"), default_model)
        linked_variant(cand_home, default_model, CANDIDATE)
        candidate = LocalServer.start(cand_home, model=CANDIDATE, kv_cache_gib="0.5", review_policy="off")
        started.append(candidate)
        served = LocalServer.start(
            linked_home(tmp_path_factory.mktemp("served-home"), default_model), kv_cache_gib="0.5",
            review_share="0", review_candidate="remote", review_candidate_url=f"{candidate.url}/v1",
            review_candidate_model=CANDIDATE, review_candidate_api_key=STUDENT_KEY,
            review_candidate_temperature="1.5")  # hot: the two answers of a pair differ, so the test can tell them
        started.append(served)
    except ServerFailed as exc:
        for srv in started:
            srv.stop()
        pytest.fail(str(exc))
    yield served, candidate
    for srv in reversed(started):
        srv.stop()


def ask_for_review(served: LocalServer) -> dict[str, str]:
    """Chats marked for review; returns each chat id with the answer the student got."""
    answers = {}
    with httpx.Client(base_url=served.url, timeout=120, headers={"Authorization": f"Bearer {STUDENT_KEY}",
                                                                  "X-Zephyr-Review": "true"}) as http:
        for question in QUESTIONS:
            reply = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            answers[body["id"]] = body["choices"][0]["message"]["content"]
    db = served.home / "zephyr.db"
    for _ in range(480):  # the candidates come from the other server after the answers
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                f"SELECT model, status FROM generations WHERE parent_id IN ({', '.join('?' * len(answers))})",
                list(answers)).fetchall()
        if len(rows) == len(answers):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"review candidates were not made:\n{served.log_tail()}")
    assert rows == [(CANDIDATE, "ok")] * len(answers)
    return answers


def judge(served: LocalServer, answers: dict[str, str], served_wins: int) -> None:
    """A reviewer judges each blind pair through the API: the served answer wins the first `served_wins` items,
    the candidate the rest. The test, not the reviewer, knows which answer is which (by the student's text)."""
    with httpx.Client(base_url=served.url, timeout=60, headers={"Authorization": f"Bearer {REVIEWER}"}) as http:
        for n in range(len(answers)):
            item = http.get("/review/api/next").json()["item"]
            assert item is not None and item["kind"] == "pair", item
            # Blind: nothing in an answer tells which model wrote it.
            assert not any("model" in key for answer in item["answers"] for key in answer), item["answers"]
            texts = [answer["text"] for answer in item["answers"]]
            served_text = answers[item["item_id"]]
            assert texts.count(served_text) == 1, texts
            served_label = "ab"[texts.index(served_text)]
            choice = served_label if n < served_wins else "ba"["ab".index(served_label)]
            reply = http.post("/review/api/verdicts", json={"assignment_id": item["assignment_id"],
                                                            "verdict": choice, "strength": 2})
            assert reply.status_code == 201, reply.text
        assert http.get("/review/api/next").json()["item"] is None


@pytest.fixture(scope="module")
def export(servers, tmp_path_factory) -> Path:
    """Six chats judged blind, the candidate winning 5 of 6, exported as DPO pairs."""
    served, _ = servers
    answers = ask_for_review(served)
    judge(served, answers, served_wins=1)
    out = tmp_path_factory.mktemp("export") / "reviews.jsonl"
    # every decisive verdict, as the gate needs (these chats are asked with a small max_tokens), each item judged by
    # this test's one reviewer (the server waits for two)
    result = CliRunner().invoke(cli, ["review", "export", "--format", "dpo", "--out", str(out), "--include-flagged",
                                      "--include-unfinished", "--min-reviewers", "1"],
                                env={"ZEPHYR_HOME": str(served.home)})
    assert result.exit_code == 0, result.output
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(p["meta"]["chosen_model"] for p in pairs) == {CANDIDATE: 5, DEFAULT_MODEL: 1}
    return out


def test_reviewers_gate_a_candidate_served_by_a_second_server(servers, export):
    served, _ = servers
    env = {"ZEPHYR_HOME": str(served.home)}

    # Equal benchmark results (the benchmark side of the gate is tested on its own): the verdicts decide.
    store = ResultStore(Settings(home=served.home).resolved_eval_results_dir)
    for model in (DEFAULT_MODEL, CANDIDATE):
        items = {f"q{i}": float(i % 2) for i in range(40)}
        store.save(EvalRun(model=model, suite="mcq", measurements=[measurement("arc_easy", "mcq_acc_auto", "test",
                                                                                 items)]))
    gate = ["eval", "gate", "--candidate", CANDIDATE, "--baseline", DEFAULT_MODEL, "--suites", "mcq",
            "--reviews", str(export), "--min-review-pairs", "6"]
    # 5 of 6, Wilson 95% interval [43.6%, 97.0%].
    passed = CliRunner().invoke(cli, [*gate, "--min-win-rate", "0.4"], env=env)
    assert passed.exit_code == 0, passed.output
    assert "5 of 6 pairs (83.3%, 95% CI [43.6%, 97.0%])" in " ".join(passed.output.split())
    unsure = CliRunner().invoke(cli, [*gate, "--min-win-rate", "0.5"], env=env)
    assert unsure.exit_code == 1 and "gate failed on human review" in unsure.output
    few = CliRunner().invoke(cli, [*gate[:-1], "7", "--min-win-rate", "0.4"], env=env)
    assert few.exit_code == 1 and "6 decisive review pairs, fewer than the 7 required" in " ".join(few.output.split())
    # The other way round, the served model lost: the gate refuses to promote it over the candidate.
    reverse = CliRunner().invoke(cli, ["eval", "gate", "--candidate", DEFAULT_MODEL, "--baseline", CANDIDATE,
                                       "--suites", "mcq", "--reviews", str(export), "--min-review-pairs", "6"],
                                 env=env)
    assert reverse.exit_code == 1 and "1 of 6 pairs" in " ".join(reverse.output.split())


def test_verdicts_become_a_trained_candidate_that_is_quantized_served_and_gated(servers, export, tmp_path):
    """The rest of the loop, on the real default model, sized to run in minutes: two DPO steps and a W8A8 from six
    calibration samples show that each part takes the one before's output, not that the candidate is better."""
    served, _ = servers
    env = {**os.environ, "ZEPHYR_HOME": str(served.home), "ZEPHYR_EVAL_RESULTS_DIR": str(tmp_path / "results"),
           "ZEPHYR_ENFORCE_EAGER": "true",
           "ZEPHYR_QUANT_ENV": str(Settings().resolved_quant_env)}  # one per machine, made on first use
    registry = Registry(served.home / "models")

    # Verdicts -> preference pairs: validated and cleaned (PII, duplicates, overlap with ARC-Easy test). The export
    # was made to count verdicts, and these chats were cut off at a small max_tokens: no training data by default.
    pairs = tmp_path / "review-dpo.jsonl"
    default = CliRunner().invoke(cli, ["data", "review", "--input", str(export), "--out", str(pairs), "--no-clean"],
                                 env={"ZEPHYR_HOME": str(served.home)})
    assert "kept for counting verdicts, not for training: an answer cut off" in " ".join(default.output.split())
    zephyr("data", "review", "--input", str(export), "--out", str(pairs), "--against", "arc_easy",
           "--include-unfinished", env=env)  # this smoke test's short answers
    cleaned = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(cleaned) == 6 and {p["meta"]["chosen_model"] for p in cleaned} == {CANDIDATE, DEFAULT_MODEL}

    # Pairs -> DPO on the served model.
    trained = "smollm2-135m-dpo-reviews"
    recipe = tmp_path / "dpo-reviews.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "dpo", "model": DEFAULT_MODEL, "output": trained, "data": {"train": [str(pairs)]},
        "lora": {"r": 4, "alpha": 8},
        "trainer": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 256, "beta": 0.1}}))
    zephyr("train", "dpo", "--recipe", str(recipe), env=env)
    entry = registry.get(trained)
    assert (entry.manifest.parent, entry.manifest.method) == (DEFAULT_MODEL, "dpo")
    assert entry.manifest.recipe["data"]["train"] == [str(pairs)]
    assert entry.manifest.stats["data_cleaning"] == {"cleaned": 6, "cleaned_partly": 0, "never_cleaned": 0,
                                                      "unstamped": 0}

    # The trained entry -> W8A8, calibrated on ARC-Easy train chats.
    zephyr("quantize", "--model", trained, "--method", "w8a8", "--calibration-sources", "arc_easy:train",
           "--samples", "6", "--seq-len", "128", env=env)
    quantized = f"{trained}-w8a8"
    made = registry.get(quantized).manifest
    assert (made.parent, made.method) == (trained, "w8a8")

    # Served, answering chats and MCQs, and gated against the served model over the same questions, each scored
    # through its own server's /mcq (a handful of questions: the gate must compare, not judge a 2-step model).
    try:
        server = LocalServer.start(served.home, model=quantized, kv_cache_gib="0.5", review_policy="off")
    except ServerFailed as exc:
        pytest.fail(str(exc))
    try:
        with httpx.Client(base_url=server.url, timeout=120,
                          headers={"Authorization": f"Bearer {STUDENT_KEY}"}) as http:
            chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTIONS[0]}],
                                                            "max_tokens": 8, "temperature": 0})
            assert chat.status_code == 200 and chat.json()["model"] == quantized, chat.text
            mcq = http.post("/mcq", json={"question": "Which planet is closest to the Sun?",
                                          "options": ["Mercury", "Venus", "Earth", "Mars"], "method": "cloze"})
            assert mcq.status_code == 200 and mcq.json()["answer"] in ("A", "B", "C", "D"), mcq.text
        for model, url in ((DEFAULT_MODEL, served.url), (quantized, server.url)):
            zephyr("eval", "run", "--model", model, "--suite", "mcq", "--benchmarks", "arc_easy", "--limit", "16",
                   "--no-local", "--server", url, "--api-key", STUDENT_KEY, env=env)
    finally:
        server.stop()
    store = ResultStore(tmp_path / "results")
    for model in (DEFAULT_MODEL, quantized):
        served_answers = store.latest(model).get("arc_easy/mcq_acc_auto_server")
        assert served_answers is not None and len(served_answers.items) == 16, model
    gate = zephyr("eval", "gate", "--candidate", quantized, "--baseline", DEFAULT_MODEL, "--suites", "mcq",
                  "--max-drop", "100", "--min-items", "16", env=env)
    assert f"gate passed: {quantized} is within 100.0 points" in " ".join(gate.stdout.split()), gate.stdout
