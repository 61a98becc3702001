"""Multiple-choice scoring: cloze (log-likelihood, lm-eval tasks in evals/tasks) and letter format (the prompt,
letter tokens and renormalization of zephyr/mcq.py: the exact computation behind the service's /mcq)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from evals.results import Measurement, measurement, method_metric
from offline.benchmarks import MMLU_STEM, write_items
from zephyr import mcq
from zephyr.schemas import MCQItem

TASKS_DIR = Path(__file__).parent / "tasks"


def task_config(benchmark: str, data_file: Path, demonstrations: str = "") -> dict[str, Any]:
    """The benchmark's lm-eval task over `data_file`; with `demonstrations`, each prompt starts with them (the
    items file then carries them in a `demonstrations` column: write_task_items)."""
    config = yaml.safe_load((TASKS_DIR / f"{benchmark}.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(data_file)
    if demonstrations:
        config["doc_to_text"] = "{{demonstrations}}" + config["doc_to_text"]
    return config


def write_task_items(items: list[MCQItem], path: Path, demonstrations: str = "") -> Path:
    """The items file an lm-eval task reads; the demonstrations go in as a column rather than into the template,
    so no character of theirs is read as Jinja."""
    if not demonstrations:
        return write_items(items, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item.model_dump() | {"demonstrations": demonstrations}) + "\n")
    return path


def _groups(items: list[MCQItem], values: dict[str, float]) -> dict[str, float]:
    """Per-subject accuracy and the STEM aggregate (MMLU); empty for benchmarks without subjects."""
    by_subject: dict[str, list[float]] = {}
    for item in items:
        if item.subject:
            by_subject.setdefault(item.subject, []).append(values[item.id])
    if not by_subject:
        return {}
    groups = {subject: sum(v) / len(v) for subject, v in sorted(by_subject.items())}
    stem = [v for subject, vs in by_subject.items() if subject in MMLU_STEM for v in vs]
    if stem:
        groups["stem"] = sum(stem) / len(stem)
    return groups


def cloze(lm: Any, benchmarks: dict[str, tuple[str, list[MCQItem]]], workdir: Path,
          demonstrations: str = "") -> list[Measurement]:
    """Log-likelihood accuracy (acc and length-normalized acc_norm) of every benchmark, in one lm-eval call so
    vLLM batches across them; every prompt after `demonstrations` (a calibration record's, as /mcq asks)."""
    import lm_eval

    tasks = [task_config(name, write_task_items(items, workdir / f"{name}.jsonl", demonstrations), demonstrations)
             for name, (_, items) in benchmarks.items()]
    cache_before = dict(getattr(lm, "prefix_stats", {}))
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True, bootstrap_iters=0,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    seconds = time.perf_counter() - started
    total = sum(len(items) for _, items in benchmarks.values())
    # How much of the prompts the options' shared contexts took from the prefix cache (evals/engine.py).
    prefix_cache = {k: v - cache_before.get(k, 0) for k, v in getattr(lm, "prefix_stats", {}).items()}
    out = []
    for name, (split, items) in benchmarks.items():
        samples = results["samples"][f"zephyr_{name}"]
        # Each option's log-likelihood, for the methods that combine or calibrate them (auto, evals/calibration).
        # Kept whole: `auto` is computed from these, and the service from the engine's unrounded ones (rounded to
        # 6 decimals, a near-tie the service broke one way was broken the other way in process).
        loglikelihoods = {s["doc"]["id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}
        for metric in ("acc", "acc_norm"):
            values = {s["doc"]["id"]: float(s[metric]) for s in samples}
            details: dict[str, Any] = {"prefix_cache_all_benchmarks": prefix_cache} if prefix_cache else {}
            if demonstrations:
                details["demonstrations"] = demonstrations
            if metric == "acc":
                details["loglikelihoods"] = loglikelihoods
            # lm-eval scores all benchmarks together: each gets its share of the time by question count.
            out.append(measurement(name, f"cloze_{metric}", split, values, groups=_groups(items, values),
                                   seconds=seconds * len(items) / total, details=details))
    return out


def question_of(item: MCQItem) -> mcq.MCQuestion:
    """The question as the service builds it from the same fields (the support passage included)."""
    return mcq.MCQuestion(item.question, tuple(item.options), mcq.normalize_support(item.support))


def question_domains(items: list[MCQItem], head: mcq.QuestionDomain, encoder: Any = None) -> dict[str, list[float]]:
    """Per item, which set it reads like (the head's probabilities), as the service computes them; the encoder is
    loaded here unless given."""
    from zephyr.encoder import load_encoder

    encoder = encoder if encoder is not None else load_encoder()
    probabilities = head.read(encoder, [question_of(item) for item in items], progress=len(items) > 200)
    return dict(zip([item.id for item in items], probabilities, strict=True))


def option_scores(items: list[MCQItem], letter_m: Measurement | None, cloze_m: Measurement | None,
                  prior_m: Measurement | None = None,
                  domains: dict[str, list[float]] | None = None) -> dict[str, mcq.OptionScores]:
    """Per item, the raw per-option scores the letter, cloze and answer-prior measurements kept, and (where given)
    which set it reads like."""
    letter = letter_m.details.get("letter_logprobs", {}) if letter_m else {}
    cloze = cloze_m.details.get("loglikelihoods", {}) if cloze_m else {}
    prior = prior_m.details.get("loglikelihoods", {}) if prior_m else {}
    out = {}
    for item in items:
        scores = mcq.OptionScores(support=mcq.normalize_support(item.support) is not None)
        if item.id in cloze:
            scores = mcq.cloze_scores(item.options, cloze[item.id], support=scores.support)
        out[item.id] = dataclasses.replace(scores, letter=letter.get(item.id), answer_prior=prior.get(item.id),
                                           domain=(domains or {}).get(item.id))
    return out


def planned(name: str, split: str, items: list[MCQItem], scores: dict[str, mcq.OptionScores], plan: mcq.Plan,
            metric: str) -> Measurement:
    """Accuracy and calibration of one /mcq method computed from stored per-option scores, through the same
    zephyr/mcq.py plan the service applies: what the service answers for these questions."""
    from evals import calibration

    answers, values, probabilities, exact = {}, {}, {}, []
    for item in items:
        probs, answer = plan.distribution(scores[item.id], mcq.LETTERS[: len(item.options)])
        answers[item.id], values[item.id] = answer, float(answer == item.answer)
        probabilities[item.id] = [round(p, 6) for p in probs.values()]  # rounded to store only
        exact.append(list(probs.values()))
    gold = [mcq.LETTERS.index(item.answer) for item in items]
    # The figures read the plan's own answers and unrounded probabilities: the argmax of rounded ones may pick
    # another option at a near-tie, and ECE and coverage would then disagree with the accuracy reported.
    figures = calibration.summarize(exact, gold, [mcq.LETTERS.index(answers[item.id]) for item in items])
    return measurement(name, metric, split, values, groups=_groups(items, values),
                       details={"answers": answers, "probabilities": probabilities, "method": plan.method,
                                "calibrated": plan.calibrated, "weights": plan.weights,
                                # which record: the gate refuses figures of one the entry no longer serves
                                "record_created_at": plan.calibration.created_at.isoformat()
                                if plan.calibration else None,
                                "calibration": {k: v for k, v in figures.items() if k not in ("n", "accuracy")}})


def letter(llm: Any, tokenizer: Any, name: str, split: str, items: list[MCQItem], explain: bool = False,
           explain_max_tokens: int = 256, max_prompt_tokens: int | None = None) -> Measurement:
    """Letter-format accuracy: one forward pass per question whose next token may only be an option letter,
    scored from the letters' exact log-probabilities, as POST /mcq does. With `explain`, as POST /mcq with
    `"explain": true` does: greedy reasoning first (up to `explain_max_tokens`, stopping at an answer line),
    then the answer cue, then the letter (metric `letter_acc_explain`, the reasoning kept in details)."""
    from vllm import SamplingParams, TokensPrompt

    questions = [question_of(item) for item in items]
    started = time.perf_counter()
    explanations: list[str | None] = [None] * len(items)
    if explain:
        context = llm.llm_engine.model_config.max_model_len
        first = [mcq.encode_prompt(tokenizer, q, explain=True) for q in questions]
        # A question the service would refuse (no room to reason) is still asked, with one token: scored, not lost.
        reasoning = llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in first],
            [SamplingParams(max_tokens=max(1, mcq.explain_budget(len(ids), context, max_prompt_tokens,
                                                                 explain_max_tokens)),
                            temperature=0.0, stop=mcq.EXPLAIN_STOP) for ids in first], use_tqdm=True)
        explanations = [o.outputs[0].text.strip() for o in reasoning]
    prompts, params = [], []
    for item, question, explanation in zip(items, questions, explanations, strict=True):
        letter_ids = mcq.letter_token_ids(tokenizer, len(item.options), leading_space=explain)
        prompts.append(TokensPrompt(prompt_token_ids=mcq.encode_prompt(tokenizer, question, explain=explain,
                                                                       reasoning=explanation)))
        params.append(SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=letter_ids,
                                     logprob_token_ids=letter_ids, detokenize=False))
    outputs = llm.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - started
    answers, values, probabilities, letter_logprobs = {}, {}, {}, {}
    for item, output, param in zip(items, outputs, params, strict=True):
        logprobs = output.outputs[0].logprobs[0]
        letters = mcq.LETTERS[: len(item.options)]
        raw = [logprobs[t].logprob for t in param.allowed_token_ids]
        probs, answer = mcq.letter_distribution(letters, raw)
        answers[item.id], values[item.id] = answer, float(answer == item.answer)
        probabilities[item.id] = round(probs[answer], 6)
        letter_logprobs[item.id] = mcq.log_softmax(raw)  # whole, as the cloze scores
    details: dict[str, Any] = {"answers": answers, "answer_probability": probabilities,
                               "letter_logprobs": letter_logprobs}
    if explain:
        details["explanations"] = {item.id: text for item, text in zip(items, explanations, strict=True)}
    return measurement(name, method_metric("explain" if explain else "letter"), split, values,
                       groups=_groups(items, values), seconds=seconds, details=details)


def answer_prior(llm: Any, tokenizer: Any, name: str, split: str, items: list[MCQItem],
                 context: str, demonstrations: str = "") -> Measurement:
    """Each option's log-likelihood after the answer cue `context`, without the question (zephyr/mcq.py:
    answer_prior_requests, exactly what /mcq sends when its method reads it). The accuracy is how often the
    option likeliest on its own is the key: the baseline a question must beat."""
    from offline.engine import continuation_loglikelihoods

    started = time.perf_counter()
    requests = [mcq.answer_prior_requests(tokenizer, question_of(item), context, demonstrations) for item in items]
    flat = iter(continuation_loglikelihoods(llm, [r for per_item in requests for r in per_item]))
    seconds = time.perf_counter() - started
    values, loglikelihoods = {}, {}
    for item, per_item in zip(items, requests, strict=True):
        scores = [next(flat) for _ in per_item]  # whole, as the cloze scores
        loglikelihoods[item.id] = scores
        values[item.id] = float(mcq.LETTERS[scores.index(max(scores))] == item.answer)
    return measurement(name, "answer_prior_acc", split, values, groups=_groups(items, values), seconds=seconds,
                       details={"loglikelihoods": loglikelihoods, "context": context,
                                **({"demonstrations": demonstrations} if demonstrations else {})})


RETRIES_WHEN_BUSY = 5


class ServerError(RuntimeError):
    """The server of `eval run --server` refused or stopped answering; the message says which and what to do."""


def via_server(url: str, api_key: str | None, name: str, split: str, items: list[MCQItem],
               batch: int = 64, concurrency: int = 4, method: str = "letter") -> Measurement:
    """Accuracy of one /mcq method through a running server's POST /mcq/batch. Questions the service refuses
    as given (duplicate options) are left out and listed in details["excluded"]."""
    import httpx

    accepted, excluded = [], []
    for item in items:
        try:
            mcq.normalize_options(item.options)
            accepted.append(item)
        except mcq.MCQFormatError:
            excluded.append(item.id)
    chunks = [accepted[i: i + batch] for i in range(0, len(accepted), batch)]
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

    served_record: dict[str, Any] = {}  # a Zephyr server's record_created_at; `vllm serve`-like ones say nothing

    async def run() -> list[dict[str, Any]]:
        limit = asyncio.Semaphore(concurrency)
        progress = tqdm(total=len(accepted), desc=f"{name} via {url}")
        async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=600) as client:
            if method == "auto":  # which record the server answers with, for the gate's staleness check
                card = await client.get("/v1/models")
                if card.status_code == 200 and (data := card.json().get("data")):
                    served_record["record_created_at"] = data[0].get("mcq_calibrated_at")

            async def one(chunk: list[MCQItem]) -> list[dict[str, Any]]:
                async with limit:
                    # min_confidence 0: the server's own floor (ZEPHYR_MCQ_MIN_CONFIDENCE) would abstain where the
                    # in-process answers never do, and every abstention would count as a wrong, different answer.
                    body = {"questions": [{"question": i.question, "options": i.options, "method": method,
                                           "min_confidence": 0.0,
                                           **({"support": i.support} if i.support else {})} for i in chunk]}
                    response = await client.post("/mcq/batch", json=body)
                    for _ in range(RETRIES_WHEN_BUSY):  # a full server says when to come back: not a failed run
                        if response.status_code != 503:
                            break
                        await asyncio.sleep(min(float(response.headers.get("retry-after") or 1), 30))
                        response = await client.post("/mcq/batch", json=body)
                    if response.status_code != 200:
                        raise ServerError(f"{url}/mcq/batch answered {response.status_code}: {response.text[:300]}")
                    progress.update(len(chunk))
                    return response.json()["results"]
            parts = await asyncio.gather(*(one(chunk) for chunk in chunks))
        progress.close()
        return [result for part in parts for result in part]

    started = time.perf_counter()
    try:
        results = asyncio.run(run())
    except httpx.HTTPError as exc:
        raise ServerError(f"{url} stopped answering part way ({type(exc).__name__}: {exc}); rerun once it is back") \
            from None
    seconds = time.perf_counter() - started
    answers = {item.id: result["answer"] for item, result in zip(accepted, results, strict=True)}
    values = {item.id: float(answers[item.id] == item.answer) for item in accepted}
    probabilities = {item.id: list(result["probabilities"].values())
                     for item, result in zip(accepted, results, strict=True)}
    return measurement(name, method_metric(method, server=True), split, values, groups=_groups(accepted, values),
                       seconds=seconds, details={"answers": answers, "probabilities": probabilities,
                                                 "excluded": excluded, "url": url, **served_record,
                                                 "method": results[0]["method"] if results else method})
