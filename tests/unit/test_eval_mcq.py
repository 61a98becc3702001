"""MCQ scoring without an engine: a model that always answers "A" must score exactly the share of A keys, in
letter format (our scorer, the service's computation) and in cloze form (lm-eval running our task YAMLs)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from evals import mcq_eval
from zephyr import mcq
from zephyr.schemas import MCQItem

KEYS = "AABCDDDBCA" + "CB"  # 3 of 12 keys are A


def items(subjects: bool = False) -> list[MCQItem]:
    return [MCQItem(id=f"q{i}", question=f"Which number is {i}?", options=[f"{i}", f"{i + 1}", f"{i + 2}", f"{i + 3}"],
                    answer=key, subject=("college_physics" if i % 2 else "world_religions") if subjects else None)
            for i, key in enumerate(KEYS)]


class AlwaysA:
    """An engine whose letter log-probabilities always favour A (a made-up, fixed distribution)."""

    def __init__(self):
        self.prompts = []

    def generate(self, prompts, params, use_tqdm=True):
        outputs = []
        for prompt, param in zip(prompts, params, strict=True):
            self.prompts.append(prompt)
            ids = param.allowed_token_ids
            logprobs = {tid: SimpleNamespace(logprob=-0.1 if n == 0 else -3.0 - n) for n, tid in enumerate(ids)}
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(logprobs=[logprobs])]))
        return outputs


def test_letter_format_always_a_scores_the_share_of_a_keys(tokenizer):
    engine = AlwaysA()
    m = mcq_eval.letter(engine, tokenizer, "arc_easy", "test", items(subjects=True))
    assert m.score == pytest.approx(KEYS.count("A") / len(KEYS))
    assert set(m.details["answers"].values()) == {"A"}
    assert m.items == {f"q{i}": float(k == "A") for i, k in enumerate(KEYS)}
    assert m.groups["world_religions"] == pytest.approx(KEYS[::2].count("A") / 6)
    assert m.groups["college_physics"] == pytest.approx(KEYS[1::2].count("A") / 6)
    assert "stem" in m.groups  # college_physics is a STEM subject
    # The prompt is the service's prompt, token for token.
    question = mcq.MCQuestion(items()[0].question, tuple(items()[0].options))
    assert engine.prompts[0]["prompt_token_ids"] == mcq.encode_prompt(tokenizer, question)


class AlwaysFirstOption:
    """An lm-eval model whose log-likelihood always prefers the first option's continuation."""

    def __new__(cls):
        from lm_eval.api.model import LM

        class _Model(LM):
            def loglikelihood(self, requests, disable_tqdm=False):
                return [(0.0, True) if r.idx == 0 else (-5.0, False) for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def generate_until(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _Model()


@pytest.mark.parametrize("benchmark", ["arc_easy", "mmlu", "sciq", "openbookqa"])
def test_cloze_tasks_always_a_scores_the_share_of_a_keys(tmp_path, benchmark):
    data = items(subjects=benchmark == "mmlu")
    (m_acc, m_norm) = mcq_eval.cloze(AlwaysFirstOption(), {benchmark: ("test", data)}, tmp_path)
    assert (m_acc.metric, m_norm.metric) == ("cloze_acc", "cloze_acc_norm")
    assert m_acc.score == pytest.approx(KEYS.count("A") / len(KEYS))
    assert m_acc.items == {f"q{i}": float(k == "A") for i, k in enumerate(KEYS)}
    if benchmark == "mmlu":
        assert set(m_acc.groups) == {"college_physics", "world_religions", "stem"}


def test_task_yaml_reads_the_given_file(tmp_path):
    config = mcq_eval.task_config("arc_challenge", tmp_path / "items.jsonl")
    assert config["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "items.jsonl")
    assert config["task"] == "zephyr_arc_challenge" and config["output_type"] == "multiple_choice"


class _NextTokenLLM:
    """Stands in for the vllm.LLM inside lm-eval's model: a request's next-token log-probabilities, -(id / 100)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(([p["prompt_token_ids"] for p in prompts], params))
        return [SimpleNamespace(outputs=[SimpleNamespace(logprobs=[
            {tid: SimpleNamespace(logprob=-tid / 100) for tid in p.logprob_token_ids}])]) for p in params]


class _RecordingVLLM:
    """Stands in for lm-eval's vLLM class: `_loglikelihood_tokens` hands the concatenated tokens to
    `_model_generate`, which answers with the cache hits given per call (and -1 per computed position)."""

    max_length = 2048

    def __init__(self, cached_per_call):
        self.calls, self.cached_per_call = [], list(cached_per_call)
        self.model = _NextTokenLLM()

    def _loglikelihood_tokens(self, requests, disable_tqdm=False):
        return self._model_generate([context + continuation for _, context, continuation in requests])

    def _model_generate(self, requests, generate=False, sampling_params=None):
        self.calls.append((requests, sampling_params))
        cached = self.cached_per_call.pop(0)
        return [SimpleNamespace(num_cached_tokens=c, call=len(self.calls), prompt_logprobs=[
            None if p <= c else {t: SimpleNamespace(logprob=-1.0)} for p, t in enumerate(tokens)])
            for c, tokens in zip(cached, requests, strict=True)]


def test_cloze_completes_a_cache_hit_of_the_context_and_rescores_one_reaching_further():
    from offline.engine import _prefix_cached

    lm = _prefix_cached(_RecordingVLLM)(cached_per_call=[[0, 40, 41, 32, 40], [0]])
    context, other = list(range(40)), list(range(50, 90))
    requests = [(None, context, [100, 101]), (None, context, [102]), (None, context, [103, 104]),
                (None, list(range(33)), [105]), (None, other, [106])]
    outputs = lm._loglikelihood_tokens(requests)

    first, again = lm.calls
    assert first[1].prompt_logprobs == 1 and first[1].skip_reading_prefix_cache is False
    # 41 cached tokens reach past the context's last position (39) into the option: scored again without the
    # cache; 32 of a 33-token context leave position 32 computed.
    assert again[0] == [context + [103, 104]] and again[1].skip_reading_prefix_cache is True
    assert [o.call for o in outputs] == [1, 1, 2, 1, 1]
    # A hit of exactly the context lacks only the first option token: one next-token request per context.
    (contexts, params), = lm.model.calls
    assert contexts == [context, other] and [p.logprob_token_ids for p in params] == [[102], [106]]
    assert all(p.max_tokens == 1 and p.skip_reading_prefix_cache is False for p in params)
    assert outputs[1].prompt_logprobs[40][102].logprob == -1.02
    assert outputs[4].prompt_logprobs[40][106].logprob == -1.06
    assert lm.prefix_stats == {"requests": 5, "prompt_tokens": 42 + 41 + 42 + 34 + 41, "cached_tokens": 112,
                               "rescored": 1, "first_token": 2, "context_requests": 2}


def test_generation_requests_pass_through_unchanged():
    from offline.engine import _prefix_cached

    lm = _prefix_cached(_RecordingVLLM)(cached_per_call=[[5]])
    params = object()
    lm._model_generate([[1, 2, 3]], generate=True, sampling_params=params)
    assert lm.calls == [([[1, 2, 3]], params)] and lm.prefix_stats["requests"] == 0


def test_requests_of_unknown_context_are_rescored_only_when_they_hit_the_cache():
    from offline.engine import _prefix_cached

    lm = _prefix_cached(_RecordingVLLM)(cached_per_call=[[0, 5], [0]])
    outputs = lm._model_generate([[1, 2, 3], [4, 5, 6, 7, 8, 9]])  # unknown: a context of 1 token
    assert lm.calls[1][0] == [[4, 5, 6, 7, 8, 9]] and [o.call for o in outputs] == [1, 2]


def test_planned_figures_read_the_answers_given_not_the_rounded_probabilities():
    # Options 1e-8 apart in cloze score: probabilities 0.5 - 2.5e-9 and 0.5 + 2.5e-9 store as 0.5 and 0.5, whose
    # argmax is A; the answer is B, right for every question. ECE and coverage must agree with that accuracy.
    questions = [MCQItem(id=f"q{i}", question=f"Which is {i}?", options=["x", "y"], answer="B") for i in range(4)]
    scores = {q.id: mcq.cloze_scores(q.options, [-3.0, -3.0 + 1e-8]) for q in questions}
    m = mcq_eval.planned("arc_easy", "test", questions, scores, mcq.plan("cloze", None), "cloze_acc")
    assert m.score == 1.0 and m.details["answers"] == {q.id: "B" for q in questions}
    assert m.details["probabilities"]["q0"] == [0.5, 0.5]  # stored rounded, as before
    figures = m.details["calibration"]
    assert figures["coverage_accuracy"] == {"100%": 1.0, "80%": 1.0, "50%": 1.0}
    assert figures["ece"] == pytest.approx(0.5) and figures["reliability"][0]["accuracy"] == 1.0


def test_via_server_asks_without_the_servers_floor_and_waits_out_a_full_server(monkeypatch):
    """The server's ZEPHYR_MCQ_MIN_CONFIDENCE abstained where in-process answers never do, and one 503 ended the run."""
    import json

    import httpx

    bodies, statuses = [], iter([503, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"mcq_calibrated_at": None}]})
        bodies.append(json.loads(request.content))
        status = next(statuses)
        if status == 503:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"message": "full"}})
        return httpx.Response(200, json={"results": [
            {"answer": "B", "probabilities": {"A": 0.4, "B": 0.6}, "method": "cloze"}]})

    real = httpx.AsyncClient
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real(transport=httpx.MockTransport(handler), **kw))
    item = MCQItem(id="q1", question="Which is a gas?", options=["rock", "air"], answer="B")
    m = mcq_eval.via_server("http://tutor", None, "arc_easy", "test", [item], method="auto")
    assert m.items == {"q1": 1.0} and len(bodies) == 2  # retried once, after the server's Retry-After
    assert all(q["min_confidence"] == 0.0 for q in bodies[0]["questions"])
    assert m.details["record_created_at"] is None  # what the server said it answers with
