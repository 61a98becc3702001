"""A school day's traffic for Locust: students chatting (streamed), classes taking MCQ exams that start all at
once, and a couple of reviewers working through the review queue.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 4 -t 5m \
        --csv load-results/load --html load-results/load.html

`make load` starts a local server and runs this against it (loadtest/load.py). Settings, by environment:
ZEPHYR_LOAD_STUDENT_KEY / ZEPHYR_LOAD_REVIEWER_KEYS (API keys, the latter comma-separated),
ZEPHYR_LOAD_MCQ_DATA (ARC-format jsonl),
ZEPHYR_LOAD_EXAM_PERIOD (seconds between exam starts), and ZEPHYR_LOAD_EVENTS: a file that gets one JSON
line per request (start, end, status, request id, whether a stream ended with [DONE]), which the soak run
and the fault drills check against the server's generation log.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import requests
from locust import HttpUser, between, events, task

from zephyr.mcq import read_arc_jsonl
from zephyr.settings import Settings

STUDENT_KEY = os.environ.get("ZEPHYR_LOAD_STUDENT_KEY", "")
# One key per reviewer: two users of one key would be one reviewer judging in two tabs.
REVIEWER_KEYS = os.environ.get("ZEPHYR_LOAD_REVIEWER_KEYS", "").split(",")
MCQ_DATA = Path(os.environ.get(
    "ZEPHYR_LOAD_MCQ_DATA", Settings().data_dir / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl"))
EXAM_PERIOD_S = float(os.environ.get("ZEPHYR_LOAD_EXAM_PERIOD", "60"))
EXAM_QUESTIONS = 8
TIMEOUT_S = 300

# Opening questions and the follow-ups students actually send; answers are asked for at typical lengths.
QUESTIONS = [
    "Explain how photosynthesis works.", "Why is the sky blue?", "What is Newton's second law?",
    "How do vaccines train the immune system?", "What causes the seasons on Earth?",
    "Explain the difference between mitosis and meiosis.", "What is an electric current?",
    "How does a rainbow form?", "Why do objects float or sink?", "What is the water cycle?",
    "How do plants take up water?", "What is a chemical reaction?", "What is an atom made of?",
    "What is the greenhouse effect?", "How does sound travel?", "What is DNA and what does it do?",
    "I don't get why heavier things don't fall faster. Can you help?",
    "My homework asks how the moon causes tides. Where do I start?",
]
FOLLOW_UPS = ["Can you give me an example?", "Why?", "Can you explain that more simply?",
              "How would that be on a test?", "What's a common mistake here?"]
ANSWER_TOKENS = [(48, 0.3), (128, 0.45), (256, 0.2), (512, 0.05)]  # (max_tokens, share of requests)


class EventLog:
    """One JSON line per request for the soak run and the drills; gevent never switches inside a write."""

    def __init__(self, path: str | None):
        self.handle = open(path, "a", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115

    def write(self, **event) -> None:
        if self.handle:
            self.handle.write(json.dumps(event) + "\n")


EVENTS = EventLog(os.environ.get("ZEPHYR_LOAD_EVENTS"))


def load_questions(path: Path) -> list[dict]:
    if not path.exists():
        # One question would be answered from the prefix cache every time, and MCQ latencies would flatter.
        raise SystemExit(f"{path} is missing: the exam traffic needs ARC-Easy's dev questions (ZEPHYR_DATA_DIR, or "
                         "ZEPHYR_LOAD_MCQ_DATA)")
    return [{"question": q.question, "options": list(q.options)} for q in read_arc_jsonl(path)]


MCQS = load_questions(MCQ_DATA)


def report_stream(started: float, response: requests.Response | None, error: str | None, **extra) -> None:
    """A chat streamed by hand: into Locust's statistics (a status >= 400 is a failure) and the event log."""
    status = response.status_code if response is not None else 0
    failure = error or (f"HTTP {status}" if status >= 400 else None)
    events.request.fire(request_type="SSE", name="chat", response_time=(time.time() - started) * 1000,
                        response_length=0, exception=RuntimeError(failure) if failure else None, context={})
    EVENTS.write(name="chat", start=started, end=time.time(), status=status, error=error, **extra)


def log_response(name: str, started: float, response: requests.Response, request_id: str | None = None,
                 wrong: str | None = None) -> None:
    """The event-log line for a request made with Locust's client, which counts it in its statistics itself
    and turns a connection error into status 0. `wrong`: what is wrong with a 200's body (the soak fails on it)."""
    error = getattr(response, "error", None) if response.status_code == 0 else None
    EVENTS.write(name=name, start=started, end=time.time(), status=response.status_code,
                 error=f"{type(error).__name__}: {error}" if error else wrong, id=request_id,
                 done=succeeded(response), code=error_code(response))


def mcq_answer_problem(body: dict, options: int) -> str | None:
    """What breaks /mcq's promise in a 200's body: one of the offered letters (or an abstention), with
    probabilities over exactly those letters that sum to 1."""
    letters = [chr(ord("A") + i) for i in range(options)]
    probabilities = body.get("probabilities") or {}
    if sorted(probabilities) != letters or abs(sum(probabilities.values()) - 1) > 1e-3:
        return f"probabilities {probabilities} are not a distribution over {''.join(letters)}"
    if body.get("answer") not in letters and not (body.get("answer") is None and body.get("abstained")):
        return f"answer {body.get('answer')!r} is none of {''.join(letters)}"
    return None


class Student(HttpUser):
    """Asks a question, reads the streamed answer, sometimes follows up, then thinks for a while. One turn
    per task, so that a stopping run waits for one answer at most, not a whole conversation."""

    weight = 6

    def on_start(self) -> None:
        self.http = requests.Session()  # streamed by hand, to time the first token and the whole answer
        self.http.headers["Authorization"] = f"Bearer {STUDENT_KEY}"
        self.messages: list[dict] = []
        self.turns_left = 0

    def wait_time(self) -> float:
        return random.uniform(2, 6) if self.turns_left else random.uniform(4, 12)  # follow-up or new topic

    @task
    def turn(self) -> None:
        if not self.turns_left:
            self.messages = [{"role": "user", "content": random.choice(QUESTIONS)}]
            self.turns_left = random.choice([1, 1, 1, 2, 3])
        self.turns_left -= 1
        answer = self.stream_chat(self.messages)
        if answer is None:
            self.turns_left = 0
            return
        self.messages += [{"role": "assistant", "content": answer},
                          {"role": "user", "content": random.choice(FOLLOW_UPS)}]

    def stream_chat(self, messages: list[dict]) -> str | None:
        max_tokens = random.choices(*zip(*ANSWER_TOKENS, strict=True))[0]
        body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0.7}
        started = time.time()
        response, request_id, first_token, parts, done, error = None, None, None, [], False, None
        try:
            response = self.http.post(f"{self.host}/v1/chat/completions", json=body, stream=True, timeout=TIMEOUT_S)
            request_id = response.headers.get("x-request-id")
            if response.status_code == 200:
                for line in response.iter_lines(decode_unicode=True):
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        try:
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                error = f"stream error: {chunk['error'].get('message')}"
                            elif chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                                first_token = first_token or time.time()
                                parts.append(chunk["choices"][0]["delta"]["content"])
                        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                            # a broken frame must reach the event log the soak judges, not only Locust's own log
                            error = f"malformed stream event: {line[:200]!r}"
                            break
                if not done and error is None:
                    error = "stream ended without [DONE]"
        except requests.RequestException as exc:
            error = f"{type(exc).__name__}: {exc}"
        if first_token is not None:
            events.request.fire(request_type="SSE", name="chat: first token",
                                response_time=(first_token - started) * 1000, response_length=0, context={})
        report_stream(started, response, error, id=request_id, done=done, code=error_code(response),
                      first_token=first_token)
        return "".join(parts) if done and error is None else None


class ExamTaker(HttpUser):
    """A class sits an exam: everyone starts at the same moment (each EXAM_PERIOD), answers a few questions
    quickly, then waits for the next exam: the MCQ load comes in bursts."""

    weight = 3

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {STUDENT_KEY}"
        self.questions_left = 0

    def wait_time(self) -> float:
        if self.questions_left:
            return random.uniform(1, 4)
        self.questions_left = EXAM_QUESTIONS
        return EXAM_PERIOD_S - time.time() % EXAM_PERIOD_S  # the bell rings for the whole class at once

    @task
    def answer_question(self) -> None:
        if not self.questions_left:
            return  # the first task runs before any wait: the exam has not started yet
        self.questions_left -= 1
        question = random.choice(MCQS)
        explain = random.random() < 0.15
        started = time.time()
        # catch_response: a 200 whose body breaks /mcq's promise is a failure in Locust's reports too
        with self.client.post("/mcq", json={**question, "explain": explain}, timeout=TIMEOUT_S,
                              name="mcq (explain)" if explain else "mcq", catch_response=True) as response:
            body, wrong = json_body(response)
            wrong = wrong or (mcq_answer_problem(body, len(question["options"])) if body else None)
            if wrong:
                response.failure(wrong)
        log_response("mcq", started, response, body.get("id"), wrong)


class Reviewer(HttpUser):
    """Signs in to the review page's API with a cookie, then judges whatever the queue offers."""

    fixed_count = 2
    wait_time = between(5, 15)
    signed_in = 0

    def on_start(self) -> None:
        key = REVIEWER_KEYS[Reviewer.signed_in % len(REVIEWER_KEYS)]
        Reviewer.signed_in += 1
        started = time.time()
        response = self.client.post("/review/session", json={"key": key}, name="review: sign in")
        log_response("review", started, response)  # a broken sign-in fails the soak, not 401s read as review traffic

    @task
    def judge_next(self) -> None:
        started = time.time()
        response = self.client.get("/review/api/next", name="review: next")
        body, wrong = json_body(response)
        item = body.get("item")
        if item is not None and not (isinstance(item, dict) and {"kind", "assignment_id"} <= item.keys()):
            wrong = f"an item without kind and assignment_id: {str(item)[:200]}"
        log_response("review", started, response, wrong=wrong)
        if not item or wrong:
            return
        time.sleep(random.uniform(3, 10))  # reading both answers
        verdict = random.choice(["a", "b", "tie", "both_bad"]) if item["kind"] == "pair" else random.choice(
            ["good", "bad"])
        body = {"assignment_id": item["assignment_id"], "verdict": verdict,
                "strength": random.randint(1, 4) if verdict in ("a", "b") else None}
        started = time.time()
        response = self.client.post("/review/api/verdicts", json=body, name="review: verdict")
        log_response("review", started, response)


def json_body(response: requests.Response) -> tuple[dict, str | None]:
    """A 200's JSON object, and what is wrong with it (not JSON, not an object), for the event log the soak judges:
    an exception here reached only Locust's own log."""
    if response.status_code != 200:
        return {}, None
    try:
        body = response.json()
    except ValueError:
        return {}, f"a 200 whose body is not JSON: {response.text[:200]!r}"
    return (body, None) if isinstance(body, dict) else ({}, f"a 200 whose body is not a JSON object: {body!r:.200}")


def succeeded(response: requests.Response | None) -> bool:
    # Not `response.ok`: on Locust's status-0 response (no connection) it raises the connection error.
    return response is not None and 200 <= response.status_code < 300


def error_code(response: requests.Response | None) -> str | None:
    if response is None or succeeded(response) or response.status_code == 0:
        return None
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
