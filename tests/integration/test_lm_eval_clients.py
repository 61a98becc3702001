"""lm-eval's API models against the real server: `local-completions` scores ARC-Easy log-likelihoods through
POST /v1/completions (echo + logprobs) and must find what `zephyr eval run` finds in process on the same items;
`local-chat-completions` runs GSM8K generations through /v1/chat/completions (issue 26, items 2 and 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from evals.mcq_eval import task_config, write_task_items
from evals.results import ResultStore
from loadtest.harness import linked_variant
from offline import benchmarks
from tests.integration.conftest import IN_PROCESS_ENGINE_ENV, STUDENT_KEY
from tests.integration.numerics import loglikelihood_tolerance
from zephyr.settings import DEFAULT_MODEL, Settings

pytestmark = pytest.mark.integration

ARC_ITEMS = 20
GSM8K_ITEMS = 5
# Per option, the summed log-likelihood through the server may differ from the in-process one by this much. Both
# run vLLM with the same engine arguments on the same tokens (lm-eval's tokenizer, token ids sent), but not in the
# same batches: the server scores each option as a request of its own (lm-eval sends 4 at a time here) and
# computes every prompt position, while the in-process scorer batches all options together and reads their shared
# question from the prefix cache. Measured on 20 ARC-Easy test items (2026-11-30, CPU): every one of the 80
# options equal to the 6 decimals the eval results keep, and the same accuracy (0.600). The bound is the one
# tests/integration/test_evals.py allows between the prefix-cached and the plain path; the accuracy must be equal
# (both where the scores are bit-identical: not bf16 on a CPU with AMX, 2026-12-02).
LOGLIKELIHOOD_TOLERANCE = 1e-4  # where bit-identical; bf16 on AMX: tests/integration/numerics.py


def _zephyr(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True,
                          timeout=1200)


def _api_model(server, route: str) -> dict[str, object]:
    return {"model": DEFAULT_MODEL, "base_url": f"{server.url}/v1/{route}", "max_retries": 1, "timeout": 300}


def test_local_completions_log_likelihoods_equal_zephyr_eval_runs_cloze(tmp_path, server, default_model,
                                                                       monkeypatch):
    import lm_eval

    items = benchmarks.load("arc_easy", data_dir=Settings().data_dir, limit=ARC_ITEMS)
    assert len(items) == ARC_ITEMS

    # In process: `zephyr eval run`'s cloze, lm-eval's vLLM model on these items, into a private registry.
    home = tmp_path / "home"
    linked_variant(home, default_model, DEFAULT_MODEL)
    env = {**os.environ, "ZEPHYR_HOME": str(home), **IN_PROCESS_ENGINE_ENV}
    run = _zephyr("eval", "run", "--model", DEFAULT_MODEL, "--suite", "mcq", "--benchmarks", "arc_easy",
                  "--limit", str(ARC_ITEMS), env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    local = ResultStore(home / "eval-results").latest(DEFAULT_MODEL).get("arc_easy/cloze_acc")
    assert local.n == ARC_ITEMS

    # Through the server: lm-eval's local-completions model on the same task and items, token ids sent, after the
    # same demonstrations (those of the default model's calibration record, if an earlier test wrote one).
    monkeypatch.setenv("OPENAI_API_KEY", STUDENT_KEY)
    demonstrations = local.details.get("demonstrations", "")
    config = task_config("arc_easy", write_task_items(items, tmp_path / "arc_easy.jsonl", demonstrations),
                         demonstrations)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={**_api_model(server, "completions"), "tokenizer": str(default_model.path),
                    "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 4},
        tasks=[config], log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
        torch_random_seed=0)
    samples = {s["doc"]["id"]: s for s in results["samples"]["zephyr_arc_easy"]}
    served = {item_id: [float(r[0]) for r in s["filtered_resps"]] for item_id, s in samples.items()}

    in_process = local.details["loglikelihoods"]
    assert served.keys() == in_process.keys()
    differences = [abs(a - b) for item_id in served for a, b in zip(served[item_id], in_process[item_id], strict=True)]
    accuracy = sum(float(s["acc"]) for s in samples.values()) / len(samples)
    print(f"\nlocal-completions acc {accuracy:.3f} vs zephyr eval run cloze_acc {local.score:.3f} on {ARC_ITEMS} "
          f"ARC-Easy test items; per-option |difference| max {max(differences):.5f}, "
          f"mean {sum(differences) / len(differences):.5f} over {len(differences)} options")
    tolerance = loglikelihood_tolerance(LOGLIKELIHOOD_TOLERANCE)
    assert max(differences) <= tolerance
    # The same answer for every question whose two best options are further apart than the scores may move (all of
    # these items where the scores are bit-identical); the accuracy may differ by the others only.
    close = 0
    for item_id, scores in served.items():
        best, second = sorted(in_process[item_id], reverse=True)[:2]
        if best - second <= 2 * tolerance:
            close += 1
            continue
        assert scores.index(max(scores)) == in_process[item_id].index(max(in_process[item_id])), item_id
    assert abs(accuracy - local.score) <= close / len(samples) + 1e-9


GSM8K_TASK = {
    "task": "zephyr_gsm8k_chat",
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": None}},
    "test_split": "test",
    "output_type": "generate_until",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{answer.split('####')[-1].strip()}}",
    "generation_kwargs": {"until": ["Question:"], "max_gen_toks": 48, "do_sample": False, "temperature": 0.0},
    "filter_list": [{"name": "flexible-extract", "filter": [
        {"function": "regex", "group_select": -1, "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)"},
        {"function": "take_first"}]}],
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                     "ignore_case": True, "ignore_punctuation": False, "regexes_to_ignore": [",", r"\$", r"\.$"]}],
    "metadata": {"version": 1.0},
}


def test_local_chat_completions_still_runs_gsm8k_through_the_server(tmp_path, server, monkeypatch):
    import httpx
    import lm_eval

    monkeypatch.setenv("OPENAI_API_KEY", STUDENT_KEY)
    data = Settings().data_dir / "gsm8k" / "test.jsonl"
    lines = data.read_text(encoding="utf-8").splitlines()[:GSM8K_ITEMS]
    (tmp_path / "gsm8k.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = json.loads(json.dumps(GSM8K_TASK))
    config["dataset_kwargs"]["data_files"]["test"] = str(tmp_path / "gsm8k.jsonl")

    def chats() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("zephyr_http_requests_total{") and 'route="/v1/chat/completions"' in line
                   and 'status="200"' in line)

    before = chats()
    results = lm_eval.simple_evaluate(
        model="local-chat-completions", model_args=_api_model(server, "chat/completions"), tasks=[config],
        apply_chat_template=True, log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
        torch_random_seed=0)
    samples = results["samples"]["zephyr_gsm8k_chat"]
    assert len(samples) == GSM8K_ITEMS
    answers = [s["resps"][0][0] for s in samples]
    assert all(isinstance(a, str) and a.strip() and "LMEVAL_MODEL_NONE" not in a for a in answers), answers
    assert chats() - before == GSM8K_ITEMS  # each item answered by the server, once, without a retry
    score = results["results"]["zephyr_gsm8k_chat"]["exact_match,flexible-extract"]
    print(f"\nlocal-chat-completions gsm8k exact_match {score:.2f} on {GSM8K_ITEMS} items; first answer: "
          f"{answers[0][:120]!r}")
    assert 0.0 <= score <= 1.0
