"""Prometheus metrics. Each app owns its registry (tests build many apps in one process); `/metrics` also
exposes the process-global registry where vLLM publishes its own `vllm:*` engine metrics."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Routes whose answers are judged for looping (service.generation), each series made at start so a share reads 0,
# not "no data", before a route's first loop, and rate() sees that first loop.
ANSWER_ROUTES = ("chat", "completions", "review_candidate")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class RequestGauge:
    """One student request on `zephyr_requests_waiting` / `_running`, however many engine requests answer it: an
    /mcq question scores each option (and its letter, its reasoning) as engine requests of their own, which were
    each counted, so one question read as four to nine waiting requests to the autoscaler."""

    __slots__ = ("_metrics", "_state", "since", "route")

    def __init__(self, metrics: Metrics, route: str):
        """`route`: the student request's own (a chat's gauge also moves for the MCQ it pasted)."""
        self._metrics, self._state, self.since, self.route = metrics, "waiting", time.perf_counter(), route
        metrics.waiting.inc()

    def started(self) -> bool:
        """Its first token (of any of its engine requests): running. True only the first time."""
        if self._state != "waiting":
            return False
        self._metrics.waiting.dec()
        self._metrics.running.inc()
        self._state = "running"
        return True

    def done(self) -> None:
        if self._state != "done":
            (self._metrics.waiting if self._state == "waiting" else self._metrics.running).dec()
            self._state = "done"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "zephyr_http_requests", "HTTP requests by route, method and status", ["route", "method", "status"],
            registry=r,
        )
        # A stream's status is its headers' 200; one that fails later says so in-band, and is counted here.
        self.stream_errors = Counter(
            "zephyr_stream_errors", "Streams that ended in an in-band error after their 200 headers, by status",
            ["route", "status"], registry=r,
        )
        self.request_latency = Histogram(
            "zephyr_request_latency_seconds", "End-to-end request latency", ["route"], buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "zephyr_time_to_first_token_seconds", "Time to first generated token", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        # With the answer screen a stream shows an answer a sentence at a time: what a student waits for is this.
        self.time_to_first_text = Histogram(
            "zephyr_time_to_first_text_seconds", "Time to the first answer text a stream sends (with the answer "
            "screen on, its first judged sentence)", ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inter_token_latency = Histogram(
            "zephyr_inter_token_latency_seconds", "Mean time between generated tokens, per request", ["route"],
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("zephyr_prompt_tokens", "Prompt tokens processed", ["route"], registry=r)
        self.completion_tokens = Counter(
            "zephyr_completion_tokens", "Completion tokens generated", ["route"], registry=r
        )
        self.running = Gauge("zephyr_requests_running", "Requests generating (first token received)", registry=r)
        self.waiting = Gauge("zephyr_requests_waiting", "Admitted requests waiting for their first token", registry=r)
        self.rejected = Counter(
            "zephyr_requests_rejected", "Requests refused before generation", ["reason"], registry=r
        )
        self.answers = Counter(
            "zephyr_answers", "Finished generated answers by route and whether they loop (zephyr.textquality)",
            ["route", "looping"], registry=r,
        )
        for route in ANSWER_ROUTES:
            for looping in ("true", "false"):
                self.answers.labels(route, looping)
        self.mcq_answers = Counter("zephyr_mcq_answers", "MCQ answers by letter", ["letter"], registry=r)
        # One thread runs the sentence encoder for every task that reads it (its tokenizer is not thread-safe), so
        # this is what each task waits for, queue included: where `question_domain` grows under chat load, /mcq's
        # confidence waits behind the guard.
        self.encoder_seconds = Histogram(
            "zephyr_encoder_seconds", "Time from asking the sentence-encoder thread to its answer, queue included, "
            "by task", ["task"], buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )
        self.safety_refusals = Counter(
            "zephyr_safety_refusals", "Requests the safety guard answered instead of the model, by category",
            ["route", "category"], registry=r,
        )
        self.safety_withheld_answers = Counter(
            "zephyr_safety_withheld_answers", "Answers the safety guard stopped at a flagged sentence, by category",
            ["route", "category"], registry=r,
        )
        self.log_queue_depth = Gauge("zephyr_log_queue_depth", "Generation-log rows waiting to be written", registry=r)
        self.log_rows_written = Counter("zephyr_log_rows_written", "Generation-log rows written", registry=r)
        self.log_spilled_rows = Counter(
            "zephyr_log_spilled_rows", "Generation-log rows spilled to the local file", registry=r
        )
        self.log_replayed_rows = Counter(
            "zephyr_log_replayed_rows", "Spilled rows replayed into the database", registry=r
        )
        self.log_rejected_rows = Counter(
            "zephyr_log_rejected_rows", "Spilled rows the database refused, kept in the rejected file", registry=r
        )
        self.log_pruned_rows = Counter(
            "zephyr_log_pruned_rows",
            "Generation-log rows deleted past ZEPHYR_LOG_RETENTION_DAYS (the spill's rejected file's too)", registry=r
        )
        self.log_write_failures = Counter(
            "zephyr_log_write_failures", "Failed generation-log database writes", registry=r
        )
        self.review_items = Counter("zephyr_review_items", "Chats queued for human review", registry=r)
        self.review_candidates = Counter(
            "zephyr_review_candidates", "Second answers for review by outcome (ok, error, aborted, dropped)",
            ["outcome"], registry=r,
        )
        self.review_candidates_pending = Gauge(
            "zephyr_review_candidates_pending", "Second answers for review being generated", registry=r
        )
        self.review_verdicts = Counter("zephyr_review_verdicts", "Reviewer verdicts given", ["verdict"], registry=r)
        self.engine_ready = Gauge("zephyr_engine_ready", "1 once the engine answered its warm-up request", registry=r)

    def stream_failed(self, route: str) -> Callable[[int], None]:
        """What event_stream tells of a stream that failed after its headers."""
        def count(status: int) -> None:
            self.stream_errors.labels(route, str(status)).inc()
        return count

    def count_answers(self, route: str, response: list[dict]) -> None:
        """A request's answers, from its log entries: only finished answers that were shown say whether they loop
        (service.generation), so aborted answers and prompt-scoring requests stay out of the share."""
        for entry in response:
            if "looping" in entry:
                self.answers.labels(route, str(entry["looping"]).lower()).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(REGISTRY)
