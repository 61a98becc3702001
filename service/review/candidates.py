"""Second answers for review: a chat picked for review gets another candidate after the student's answer is
complete, off the request path, from the served model resampled or from another served model.

Candidates are given what they use, not the tutor: a coroutine function that runs a request on the served
model and logs its row, the generation log's `record`, and the answer guard's judge when it is on.

A candidate is screened by the same rule as the answer it is compared with: reviewers judge blind, and a guard that
stopped only the served answer would mark it (the page badges a stopped answer) while showing the candidate's text
the guard would have withheld from a student."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import openai

from service.answer_screen import Judge, screened
from service.engine import ChoiceDelta, EngineOutput, GenParams
from service.errors import APIError, failure_text
from service.generation import GenerationRequest, new_id
from service.metrics import Metrics
from service.store.models import Generation, GenerationRecord
from zephyr.settings import Settings

# Runs a request on the served model to the end, logging its row however it ends (Tutor.run_to_end).
RunRequest = Callable[[GenerationRequest], Awaitable[None]]
RecordRow = Callable[[GenerationRecord], None]  # GenerationLog.record

log = logging.getLogger("zephyr.review")
CANDIDATE_ROUTE = "review_candidate"
REMOTE_TIMEOUT_SECONDS = 120.0
# vLLM's sampling extras a remote candidate is asked with when the student's chat set them (its `extra_body`). Not
# `bad_words`: the tutor sets them after its own opening to a pasted question (the options the served model did not
# pick), which would push the remote, writing its own opening, to agree with the served model.
REMOTE_EXTRAS = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "include_stop_str_in_output",
                 "skip_special_tokens")


class Candidates:
    def __init__(self, settings: Settings, metrics: Metrics, run: RunRequest, record: RecordRow,
                 judge: Judge | None = None):
        self._run = run
        self._record = record
        self._judge = judge  # the answer guard's verdicts on sentences; None when answers are not screened
        self.settings = settings
        self.metrics = metrics
        self._tasks: set[asyncio.Task] = set()
        self._random = random.Random()
        self._remote = None
        if settings.review_candidate == "remote":
            self._remote = openai.AsyncOpenAI(
                base_url=settings.review_candidate_url, api_key=settings.review_candidate_api_key or "none",
                timeout=REMOTE_TIMEOUT_SECONDS, max_retries=2,
            )

    def wants_review(self, requested: bool) -> bool:
        policy = self.settings.review_policy
        if policy == "off":
            return False
        if requested:
            return True
        return policy == "sample" and self._random.random() < self.settings.review_share

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def schedule(self, parent: GenerationRequest, with_candidate: bool = True) -> str:
        """Starts the candidate for a finished chat; returns the review kind to log with it: "pair" when a
        candidate is on its way, "single" when none is wanted or configured, or too many are already queued."""
        self.metrics.review_items.inc()
        if self.settings.review_candidate == "none" or not with_candidate:
            return "single"
        if self.pending >= self.settings.review_max_pending:
            self.metrics.review_candidates.labels("dropped").inc()
            return "single"
        task = asyncio.create_task(self._make(parent), name=f"review-candidate-{parent.request_id}")
        self._tasks.add(task)
        self.metrics.review_candidates_pending.set(self.pending)
        task.add_done_callback(self._done)
        return "pair"

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.metrics.review_candidates_pending.set(self.pending)

    async def _make(self, parent: GenerationRequest) -> None:
        await asyncio.sleep(0)  # let the student's response go out first
        try:
            if self._remote is None:
                await self._resample(parent)
            else:
                await self._ask_remote(parent)
        except asyncio.CancelledError:
            self.metrics.review_candidates.labels("aborted").inc()
            raise
        except Exception as exc:  # a failed candidate leaves a single-answer item; never an unhandled task error
            log.warning("review candidate for %s failed: %s", parent.request_id, exc)
            self.metrics.review_candidates.labels("error").inc()
        else:
            self.metrics.review_candidates.labels("ok").inc()

    def _candidate_of(self, parent: GenerationRequest, variant: str) -> GenerationRequest:
        temperature = self.settings.review_candidate_temperature
        return GenerationRequest(
            request_id=new_id("cand"), route=CANDIDATE_ROUTE, messages=parent.messages, prompt_ids=parent.prompt_ids,
            params=replace(parent.params, n=1, logprobs=None, temperature=temperature,
                           seed=self._random.randrange(2**31)),
            principal=parent.principal, user=parent.user, extra_params={"variant": variant},
            purpose="candidate", parent_id=parent.request_id, screen_answer=parent.screen_answer,
        )

    async def _resample(self, parent: GenerationRequest) -> None:
        gen = self._candidate_of(parent, f"T={self.settings.review_candidate_temperature:g}")
        # The same opening as the served answer (a pasted question's option, service/tutor.py open_answer): the
        # pair then differs in how the two go on from it.
        gen.answer_prefix, gen.answer_prefix_ids = parent.answer_prefix, parent.answer_prefix_ids
        try:
            await self._run(gen)  # logs its own row (ok, error or aborted) with parent_id set
        except APIError as exc:
            raise RuntimeError(exc.message) from exc

    async def _ask_remote(self, parent: GenerationRequest) -> None:
        model = self.settings.review_candidate_model
        gen = self._candidate_of(parent, "remote")
        # The remote writes its own opening, if any: it gets the client's whole budget, and its row says so (a
        # min_tokens the opening covered whole stays 0).
        opening = len(parent.answer_prefix_ids)
        gen.params = replace(gen.params, max_tokens=parent.asked_max_tokens, bad_words=[],
                             min_tokens=gen.params.min_tokens + opening if gen.params.min_tokens else 0)
        status, error, revision = "error", None, None
        try:
            # Asked as the student's request was (its stop strings, penalties and vLLM's extras too): an answer
            # that stops at the first "." beside one that runs on would tell reviewers which is which. Not the
            # stop token ids: they name another tokenizer's tokens.
            params, defaults = gen.params, GenParams(max_tokens=1)
            extras = {name: getattr(params, name) for name in REMOTE_EXTRAS
                      if getattr(params, name) != getattr(defaults, name)}
            reply = await self._remote.chat.completions.create(
                model=model, messages=parent.messages,
                max_tokens=params.max_tokens, stop=params.stop or None,
                temperature=params.temperature, top_p=params.top_p, seed=params.seed,
                presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                extra_body=extras or None,
            )
            revision = await self._remote_revision(model)
            choice = reply.choices[0]
            text, finish_reason = choice.message.content or "", choice.finish_reason
            if self._judge is not None and gen.screen_answer:
                text, finish_reason = await self._screened(gen, text, finish_reason)
            gen.texts[0] = [text]
            gen.finish_reasons[0] = finish_reason
            gen.token_counts[0] = reply.usage.completion_tokens if reply.usage else 0
            self.metrics.completion_tokens.labels(CANDIDATE_ROUTE).inc(gen.completion_tokens)
            status = "ok"
        except asyncio.CancelledError:
            status, error = "aborted", "cancelled"
            raise
        except Exception as exc:
            error = failure_text(exc)
            raise
        finally:
            record = gen.record(model, status, error, model_revision=revision)
            self.metrics.count_answers(CANDIDATE_ROUTE, record.response)
            self._record(record)

    async def _remote_revision(self, model: str) -> str | None:
        """Which weights of its name the remote serves, as a Zephyr server's /v1/models says (`revision`), so a
        review pair names the candidate's weights, not only its name; None from a server that does not say (`vllm
        serve`'s `created` is the time it was asked, not the weights')."""
        try:
            listed = await self._remote.models.list()
        except Exception as exc:  # the answer matters more than its provenance
            log.warning("could not list the remote candidate's models: %s", failure_text(exc))
            return None
        card = next((m for m in listed.data if m.id == model), None)
        revision = getattr(card, "revision", None)
        if not isinstance(revision, str):
            return None
        if len(revision) > (room := Generation.model_revision.type.length):
            # PostgreSQL would refuse the row (SQLite takes it), and its batch would spill
            log.warning("the remote candidate's revision is %d characters, more than the log's %d: not recorded",
                        len(revision), room)
            return None
        return revision

    async def _screened(self, gen: GenerationRequest, text: str, finish_reason: str | None) -> tuple[str, str | None]:
        """A remote answer as the served model's answers reach a student: cut at the first sentence the guard
        flags, with the guard's reply (its verdict in the row's `answer_safety`); else as it came."""
        async def whole() -> AsyncIterator[EngineOutput]:
            # One final delta (a server may send no finish reason): every sentence is judged, the last one too.
            yield EngineOutput(choices=[ChoiceDelta(index=0, text=text, token_ids=[],
                                                    finish_reason=finish_reason or "stop")], finished=True)

        deltas = [delta async for out in screened(gen, whole(), self._judge) for delta in out.choices]
        if verdict := gen.extra_params.get("answer_safety", {}).get("0"):
            self.metrics.safety_withheld_answers.labels(CANDIDATE_ROUTE, verdict["category"]).inc()
            return "".join(d.text for d in deltas), deltas[-1].finish_reason
        return text, finish_reason

    async def idle(self) -> None:
        """Returns once every candidate started so far has finished (tests, tools)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """At shutdown: candidates still running are cancelled (each logs an `aborted` row, and its item
        is then reviewed as a single answer) before the generation log flushes."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._remote is not None:
            await self._remote.close()
