"""What the routes do: turn a chat or MCQ request into engine calls, answer in OpenAI's shapes, time it,
and hand one row per request to the generation log."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, contextmanager
from typing import Any, TypeVar

import jinja2

from service.answer_screen import screened
from service.auth import Principal
from service.engine import (
    ChoiceDelta,
    Engine,
    EngineOutput,
    EngineRejected,
    EngineUnavailable,
    GenParams,
    TokenLogprob,
)
from service.errors import APIError, failure_text
from service.generation import GenerationRequest, event_stream, new_id, one_choice_each, sse
from service.metrics import Metrics, RequestGauge
from service.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    ChoiceLogprobs,
    ClozeScores,
    MCQRequest,
    MCQResponse,
    SamplingRequest,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)
from service.review.candidates import Candidates
from service.store.log import GenerationLog
from zephyr import chat_mcq, mcq
from zephyr.prompts import control_tokens, encode_chat, with_system_prompt
from zephyr.safety import (
    FINISH_REASON,
    REPLIES,
    WINDOW_CHARS,
    SafetyGuard,
    Verdict,
    deciding,
    read_by_guard,
    students_words,
    without_refused_turns,
)
from zephyr.settings import Settings

# No tokenizer here packs more characters than this into a token of ordinary text; a prompt over
# CHARS_PER_TOKEN_BOUND characters per allowed token would be refused after tokenizing anyway.
CHARS_PER_TOKEN_BOUND = 16
ENGINE_FAILURE_REASONS = ("error", "abort")  # vLLM's finish reasons for a request it could not finish

log = logging.getLogger("zephyr.service")
T = TypeVar("T")


DOMAIN_CHUNK = 32  # questions a call when a batch's questions are embedded for their domain


class Admission:
    """Bounds the requests admitted at once: past the bound the server answers 503 at once instead of
    queueing without limit, so a load balancer can send the client elsewhere."""

    def __init__(self, limit: int, metrics: Metrics, engine: Engine):
        self.limit = limit
        self.in_flight = 0
        self.being_prepared = 0  # requests tokenized and screened before their admission (Admission.preparing)
        self.metrics = metrics
        self.engine = engine
        self.draining = False
        # Set when the server kills a stalled engine: vLLM reports it errored only once its monitor sees the process
        # gone, and a request admitted in between would wait on a dead engine instead of a 503 at once.
        self.engine_lost = False

    def drain(self) -> None:
        """From now on every new request gets a 503 (with `Connection: close`, so a keep-alive client
        reconnects, through the load balancer, to another replica); those in flight run to the end."""
        self.draining = True

    def admit(self, weight: int = 1) -> AdmissionSlot:
        """Admits `weight` requests, or refuses them with a 503. Use the slot as a context manager: the
        requests leave when the block ends, unless the block hands the slot off (`AdmissionSlot.hand_off`)."""
        self.check(weight)
        self.in_flight += weight
        return AdmissionSlot(self, weight)

    @contextmanager
    def preparing(self, weight: int = 1) -> Iterator[None]:
        """Counts `weight` requests being prepared for admission (`service.auth.admissible`): refused as `admit`
        would refuse them, counting those being prepared too, so a burst past the bound gets its 503s before it
        queues on the guard's one thread (whose sentences of the streams already running would wait behind it)."""
        self.check(weight, with_prepared=True)
        self.being_prepared += weight
        try:
            yield
        finally:
            self.being_prepared -= weight

    def check(self, weight: int = 1, *, with_prepared: bool = False) -> None:
        """The 503 `admit` would give now, without taking a place; `with_prepared`: counting the requests being
        prepared too (`preparing`)."""
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise APIError(
                503,
                "this tutor replica is shutting down; retry and another replica will answer",
                code="shutting_down",
                headers={"Retry-After": "1", "Connection": "close"},
            )
        if self.engine_lost or self.engine.errored:  # refused before a stream opens: a 503, not a 200 with an error
            self.metrics.rejected.labels("engine_dead").inc()
            raise APIError(503, "the inference engine stopped; retry and another replica will answer",
                           code="engine_unavailable", headers={"Retry-After": "1", "Connection": "close"})
        prepared = self.being_prepared if with_prepared else 0
        if self.in_flight + prepared + weight > self.limit:
            self.metrics.rejected.labels("overload").inc()
            raise APIError(
                503,
                f"the tutor is at capacity ({self.in_flight} requests in flight"
                + (f", {prepared} more being prepared" if prepared else "") + "); retry shortly",
                code="overloaded",
                headers={"Retry-After": "1"},
            )


class AdmissionSlot:
    """The place of admitted requests, given back exactly once: when the `with` block ends, or, if the block
    called `hand_off`, by whoever got the callable it returned (a streaming response, when it closes)."""

    __slots__ = ("_admission", "_weight", "_held", "_handed_off")

    def __init__(self, admission: Admission, weight: int):
        self._admission = admission
        self._weight = weight
        self._held = True
        self._handed_off = False

    def __enter__(self) -> AdmissionSlot:
        return self

    def __exit__(self, *exc_info) -> None:
        if not self._handed_off:
            self.release()

    def hand_off(self) -> Callable[[], None]:
        """The requests outlive the block: the returned callable releases them (once, however often called)."""
        self._handed_off = True
        return self.release

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission.in_flight -= self._weight


class Tutor:
    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics, log: GenerationLog,
                 calibration: mcq.MCQCalibration | None = None, guard: SafetyGuard | None = None,
                 encoder: Any = None, model_revision: str | None = None):
        self.engine = engine
        # The served registry entry's revision, in every row it writes: which weights of its name wrote them.
        self.model_revision = model_revision
        self.guard = guard  # zephyr/safety.py; None where ZEPHYR_SAFETY_GUARD is off
        # The sentence encoder's one thread: the guard and the calibration's question-domain head share it.
        self.guard_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safety-guard")
        # When the thread's current task began (None: idle): a task that never returns (a deadlocked tokenizer or
        # OpenMP pool) held every chat behind it while the server stayed ready; app.py's watchdog reads this.
        self._encoder_task_started: float | None = None
        self.encoder_wait_limit = settings.engine_stall_seconds or None
        # all-MiniLM-L6-v2 for the record's question-domain head (app.py loads it only for a record that reads it)
        self.encoder = encoder
        if calibration is not None and calibration.reads_question_domain and encoder is None:
            raise ValueError("the calibration record reads each question's domain: the tutor needs the encoder")
        # The same guard reading the model's answers as they stream (service/answer_screen.py), where it is on.
        self.answer_guard = guard.for_answers() if guard is not None and settings.safety_screen_answers else None
        self.calibration = calibration  # the served model's record from `zephyr eval calibrate`
        self.settings = settings
        self.metrics = metrics
        self.log = log
        self.admission = Admission(settings.max_in_flight, metrics, engine)
        # Every answer reads at least one generated token, so a prompt may fill the context but for one.
        self.max_prompt_tokens = min(settings.max_prompt_tokens or engine.max_model_len - 1, engine.max_model_len - 1)
        # Tokenizing costs time in proportion to characters: bound them before any tokenizer runs.
        self.max_prompt_chars = settings.max_prompt_chars or CHARS_PER_TOKEN_BOUND * self.max_prompt_tokens
        self._letter_ids: dict[tuple[int, bool], list[int]] = {}
        self.candidates = Candidates(settings, metrics, run=self.run_to_end, record=log.record,
                                     judge=self.judge_answer if self.answer_guard is not None else None)

    # Shared ---------------------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def check_model(self, requested: str | None, param: str = "model") -> None:
        if requested is not None and requested != self.model_name:
            raise APIError(404, f"{param} `{requested}` is not served here; this server serves `{self.model_name}` "
                                "(GET /v1/models)", param=param, code="model_not_found")

    def check_n(self, n: int) -> None:
        """`n` answers are admitted as `n` requests: more than ZEPHYR_MAX_IN_FLIGHT could never be admitted (a 503
        would send the client retrying for ever), so the bound is the lower of the two settings."""
        limit, setting = min((self.settings.max_n, "ZEPHYR_MAX_N"), (self.settings.max_in_flight,
                                                                     "ZEPHYR_MAX_IN_FLIGHT"))
        if n > limit:
            raise APIError(400, f"`n` is {n}; this server allows at most {limit} ({setting})", param="n")

    def check_generation(self, req: SamplingRequest, default_temperature: float = 1.0) -> None:
        """What a chat or a completion is checked for first: the model it names and its number of answers
        (`default_temperature`: the route's temperature when the request sets none)."""
        self.check_model(req.model)
        self.check_n(req.n)
        temperature = default_temperature if req.temperature is None else req.temperature
        if req.n > 1 and temperature == 0:
            # vLLM refuses it, after the stream has opened; several greedy answers would all be the same one. (It
            # samples any temperature above 0: one under 0.01 is raised to 0.01 before its greedy check.)
            said = "" if req.temperature is not None else " (the server's default for requests that set none)"
            raise APIError(400, f"`n` is {req.n} with temperature {temperature:g}{said}: greedy decoding gives one "
                                "answer; set `temperature` above 0 to sample several, or `n` to 1", param="n")

    def answer_room(self, prompt_ids: list[int], asked: int | None, param: str, defaulted: bool = False) -> int:
        """The tokens the context leaves an answer after the prompt; a 400 naming `param` if it asked for more
        (`defaulted`: the client did not send it, and the message says the limit is the default)."""
        room = self.engine.max_model_len - len(prompt_ids)
        if asked is not None and asked > room:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens and `{param}` is {asked}"
                                f"{' (the default)' if defaulted else ''}, over the context length of "
                                f"{self.engine.max_model_len}; ask for at most {room}",
                           param=param, code="context_length_exceeded")
        return room

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return encode_chat(self.engine.tokenizer, messages)
        except jinja2.TemplateError as exc:
            if type(exc) is not jinja2.TemplateError:
                raise  # a broken template (syntax, undefined names): ours to fix, a 500
            # A template's own rule (transformers' raise_exception), e.g. roles must alternate.
            raise APIError(400, f"the model's chat template refused these messages: {exc}", param="messages") from exc

    @functools.cached_property
    def _control_tokens(self) -> re.Pattern[str] | None:
        return control_tokens(self.engine.tokenizer)

    def check_control_tokens(self, text: str, param: str) -> None:
        """A client's text may not spell the model's control tokens where the model writes after it (a chat,
        `/mcq`'s `explain`): the tokenizer reads "<|im_start|>" in a message as the real marker, so a message could
        forge a system turn or the assistant's opening words after the tutor's prompt, past what the guard reads as
        one message. Scored methods (letter, cloze) answer one of the options whatever the text says, and score it
        as given."""
        if self._control_tokens is not None and (found := self._control_tokens.search(text)):
            raise APIError(400, f"`{param}` holds `{found.group()}`, one of the model's control tokens, which a "
                                "message may not contain; remove it", param=param)

    def check_prompt_chars(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise APIError(400, f"`{param}` holds {chars} characters; the limit is {self.max_prompt_chars} "
                                "(ZEPHYR_MAX_PROMPT_CHARS); shorten it", param=param, code="context_length_exceeded")

    def check_prompt_length(self, prompt_ids: list[int], param: str = "messages") -> None:
        if len(prompt_ids) > self.max_prompt_tokens:
            what = {"messages": "the conversation", "prompt": "the prompt"}.get(
                param, "the question, its options or its support")
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; the limit is {self.max_prompt_tokens} "
                                f"(shorten {what})", param=param, code="context_length_exceeded")

    async def run(self, gen: GenerationRequest) -> AsyncIterator[EngineOutput]:
        """Runs one engine request, keeping metrics and writing its log row however it ends."""
        gen.ran = True
        status, error = "aborted", None
        # Review candidates are not student requests: kept off the gauges. An engine request for an /mcq question's
        # options moves the question's gauge, which answer_mcq holds.
        own_gauge = gen.gauge is None and gen.purpose == "served"
        if own_gauge:
            gen.gauge = RequestGauge(self.metrics, gen.route)
        waiting = True
        try:
            if gen.mcq_question is not None:  # inside the try: however the scoring ends, the chat is logged
                await self.open_answer(gen)
            # aclosing: a client that disconnects aborts the engine request now, not at garbage collection.
            outputs_from = self._withheld(gen) if gen.withheld else self.engine.generate(
                gen.engine_prompt_ids, gen.params, gen.request_id)
            if self.answer_guard is not None and gen.screen_answer and gen.withheld is None:
                outputs_from = screened(gen, outputs_from, self.judge_answer)
            async with aclosing(outputs_from) as outputs:
                async for out in outputs:
                    if waiting:
                        waiting = False
                        first = gen.gauge is not None and gen.gauge.started()
                        # The guard's reply takes no engine time: not a latency sample. An /mcq question is one
                        # sample, at the first token of any of its engine requests; a chat's pasted MCQ none (the
                        # chat's own first token is its sample).
                        if gen.withheld is None and gen.route != "mcq":
                            self.metrics.time_to_first_token.labels(gen.route).observe(
                                time.perf_counter() - gen.started)
                        elif gen.route == "mcq" and first and gen.gauge.route == "mcq":
                            self.metrics.time_to_first_token.labels("mcq").observe(
                                time.perf_counter() - gen.gauge.since)
                    if failed := next((c.finish_reason for c in out.choices
                                       if c.finish_reason in ENGINE_FAILURE_REASONS), None):
                        # vLLM's own server answers these with a 500; served as they came, they were an empty
                        # "successful" answer and a row logged ok.
                        raise EngineUnavailable(f"the engine ended the answer with finish_reason {failed!r} (its "
                                                "request failed or it is shutting down); retry")
                    gen.absorb(out)
                    yield out
            status = "ok"
        except EngineRejected as exc:
            status, error = "error", str(exc)
            raise APIError(400, f"the engine refused the request: {exc}", code="invalid_request") from exc
        except EngineUnavailable as exc:
            status, error = "error", str(exc)
            raise APIError(503, str(exc), code="engine_unavailable") from exc
        except Exception as exc:  # a refusal raised on the way, or a fault of ours: the row says which, not "aborted"
            status, error = "error", failure_text(exc)
            raise
        finally:
            if own_gauge:
                gen.gauge.done()
            self.metrics.prompt_tokens.labels(gen.route).inc(len(gen.prompt_ids))
            self.metrics.completion_tokens.labels(gen.route).inc(gen.generated_tokens)
            if gen.steps > 1:
                self.metrics.inter_token_latency.labels(gen.route).observe(
                    (gen.last_token_at - gen.first_token_at) / (gen.steps - 1)
                )
            if status == "aborted":  # cancelled: the client left, or the server stopped past its drain
                error = self.why_aborted(started=not waiting)
            if gen.route != "mcq":  # MCQ rows are written by answer_mcq, which knows the answer
                if gen.for_review and status == "ok":
                    # The second answer starts after this one; a refusal is judged alone (no model answer to it).
                    gen.review_kind = self.candidates.schedule(gen, with_candidate=gen.withheld is None)
                record = gen.record(self.model_name, status, error, model_revision=self.model_revision)
                if gen.withheld is None:  # the guard's reply is not an answer of the model's
                    self.metrics.count_answers(gen.route, record.response)
                    for verdict in gen.extra_params.get("answer_safety", {}).values():
                        self.metrics.safety_withheld_answers.labels(gen.route, verdict["category"]).inc()
                elif status == "ok":  # answered: a request refused by admission, and retried, is counted once
                    self.metrics.safety_refusals.labels(gen.route, gen.extra_params["safety"]["category"]).inc()
                self.log.record(record)

    async def flagged(self, texts: list[str], phrases_in: Collection[str] | None = None) -> Verdict | None:
        """The safety guard's deciding verdict on these messages when it flags one, else None (its phrases read only
        `phrases_in`, None: all). The guard runs on its own thread: off the loop that streams answers, one message
        set at a time (its tokenizer is not shared)."""
        if self.guard is None or not any(t.strip() for t in texts):
            return None
        return deciding(await self.on_encoder("request_guard", self.guard.judge_all, texts, phrases_in))

    async def judge_answer(self, sentences: list[str]) -> list[Verdict]:
        """The answer guard's verdicts on an answer's sentences, on the guard's own thread (it shares the encoder)."""
        assert self.answer_guard is not None
        return await self.on_encoder("answer_guard", self.answer_guard.judge_all, sentences)

    async def on_encoder(self, task: str, work: Callable[..., Any], *args: Any) -> Any:
        """`work(*args)` on the sentence encoder's one thread, timed from the asking (queue included). A wait past
        ZEPHYR_ENGINE_STALL_SECONDS is a 503 to retry, not a request held as long as the client waits."""
        def timed() -> Any:
            self._encoder_task_started = time.monotonic()
            try:
                return work(*args)
            finally:
                self._encoder_task_started = None

        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel (a client gone) that lands as the
            # verdict arrives, and the request then ran to its end for no one
            async with asyncio.timeout(self.encoder_wait_limit):
                return await asyncio.get_running_loop().run_in_executor(self.guard_thread, timed)
        except TimeoutError:  # a task not yet begun is cancelled with the wait; one running cannot be stopped
            raise APIError(503, f"the safety guard gave no verdict within {self.encoder_wait_limit:g} s; retry",
                           code="guard_stalled") from None
        finally:
            self.metrics.encoder_seconds.labels(task).observe(time.perf_counter() - started)

    def encoder_busy_seconds(self) -> float:
        """How long the encoder's thread has run its current task (0: idle)."""
        started = self._encoder_task_started
        return 0.0 if started is None else time.monotonic() - started

    async def screen(self, gen: GenerationRequest, texts: list[str], phrases_in: Collection[str] | None = None) -> None:
        """A request the guard flags is answered by the guard's reply, not the model (`_withheld`); its log row
        keeps the verdict, and a chat chosen for review goes to reviewers alone (no model answer to compare), so
        wrong refusals are found."""
        if (verdict := await self.flagged(texts, phrases_in)) is None:
            return
        gen.withheld = REPLIES[verdict.category]
        gen.mcq_question = None
        gen.extra_params["safety"] = verdict.logged

    async def _withheld(self, gen: GenerationRequest) -> AsyncIterator[EngineOutput]:
        """The guard's reply as the engine would stream it: every choice finished by the filter. A completion that
        scores its prompt (`echo` with `logprobs`) still gets the log-probability of each of its prompt's tokens,
        the client's own text scored, from one engine step whose generated token is not shown; not the likeliest
        tokens at each position, which are the model's own choices: read one position at a time, the answer to
        the flagged prompt."""
        reply = [ChoiceDelta(index=i, text=gen.withheld, token_ids=[], finish_reason=FINISH_REASON)
                 for i in range(gen.params.n)]
        if not gen.params.prompt_logprobs:
            yield EngineOutput(choices=reply, finished=True)
            return
        params = dataclasses.replace(gen.params, max_tokens=1, min_tokens=0, logprobs=None, prompt_top_logprobs=0)
        async with aclosing(self.engine.generate(gen.engine_prompt_ids, params, gen.request_id)) as outputs:
            async for out in outputs:
                out.choices = reply if out.finished else []
                yield out

    # Chat -----------------------------------------------------------------------------------------------

    async def prepare_chat(self, req: ChatCompletionRequest, principal: Principal,
                           review_requested: bool = False) -> GenerationRequest:
        self.check_generation(req, self.settings.chat_temperature)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
        for index, message in enumerate(messages):
            self.check_control_tokens(message["content"], f"messages[{index}].content")
        left_out = 0
        if self.guard is not None:  # a refused request and the guard's reply are not read by the model again
            messages, left_out = without_refused_turns(messages)
        client_messages = list(messages)  # what the guard reads: not the system prompt the server adds
        messages = with_system_prompt(messages, self.settings.served_system_prompt)
        self.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        prompt_ids = await asyncio.to_thread(self.encode_chat, messages)  # off the loop that streams answers
        self.check_prompt_length(prompt_ids)
        asked = req.answer_limit
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        room = self.answer_room(prompt_ids, asked, param)
        if room < 1:
            raise APIError(400, f"the prompt fills the context length of {self.engine.max_model_len}; shorten it",
                           param="messages", code="context_length_exceeded")
        params = GenParams(
            max_tokens=asked or room,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            stop_token_ids=self.stop_token_ids(req.stop_token_ids or []),
            **req.sampling(self.settings.chat_temperature, self.settings.chat_top_p),
        )
        if params.min_tokens > params.max_tokens:
            raise APIError(400, f"`min_tokens` is {params.min_tokens}; this prompt leaves room for {params.max_tokens}",
                           param="min_tokens", code="context_length_exceeded")
        # A question pasted into the chat is answered as /mcq answers it (open_answer). Not when the client asked
        # for log-probabilities (the tutor's opening words were not sampled and have none), nor for several answers
        # (one opening would make them copies of one answer: what self-consistency or pass@k samples must not be).
        question, several = None, False
        if self.settings.chat_mcq and messages[-1]["role"] == "user" and params.logprobs is None and params.n == 1:
            try:
                questions = chat_mcq.find_questions(messages[-1]["content"], limit=2)
            except Exception:  # a fault of the reader's rules: logged, and the chat answered as any chat, not a 500
                log.exception("reading a pasted multiple-choice question failed; answered as any chat")
                questions = []
            question = questions[0] if questions else None
            several = len(questions) > 1
        gen = GenerationRequest(
            request_id=new_id("chatcmpl"), route="chat", messages=messages, prompt_ids=prompt_ids, params=params,
            principal=principal, user=req.user, extra_params={"stream": req.stream},
            # A review item is one answer (the route refuses a marked chat with n > 1; the sampler skips them).
            review_requested=review_requested,
            for_review=params.n == 1 and self.candidates.wants_review(review_requested),
            mcq_question=question, mcq_one_of_several=several, screen_answer=True,
        )
        if left_out:
            gen.extra_params["refused_turns_left_out"] = left_out
        await self.screen(gen, read_by_guard(client_messages), students_words(client_messages))
        return gen

    async def open_answer(self, gen: GenerationRequest) -> None:
        """For a chat that holds a multiple-choice question: answers it as /mcq does (`auto`, its own log row
        `<chat id>-mcq`), and makes the answer start by naming that option, as surely as its confidence allows
        (zephyr/chat_mcq.py); the model goes on from there. A question /mcq cannot take (over the prompt limit
        with the record's demonstrations), or an answer with no room for the opening, is answered as any chat."""
        try:
            result = await self.answer_mcq(gen.mcq_question, "auto", gen.principal, f"{gen.request_id}-mcq",
                                           gen.user, gauge=gen.gauge)
        except Exception as exc:  # the MCQ row says what happened; the student still gets an answer
            log.warning("chat %s: its multiple-choice question was not scored (%s); answered as any chat",
                        gen.request_id, failure_text(exc))
            return
        opening = chat_mcq.answer_opening(result.answer, result.option, result.confidence,
                                          self.settings.chat_mcq_sure_confidence, len(gen.mcq_question.options))
        ids = await asyncio.to_thread(self.engine.tokenizer.encode, opening, add_special_tokens=False)
        # The opening is prompt to vLLM, where stop sequences are not looked for: one that holds a client's stop
        # string or token would send text past it.
        if len(ids) >= gen.params.max_tokens or any(stop and stop in opening for stop in gen.params.stop) \
                or set(ids) & set(gen.params.stop_token_ids):
            return
        # Not where another question follows: its right letter may be one this answer may not conclude with.
        keep = result.answer is not None and self.settings.chat_mcq_keep_answer and not gen.mcq_one_of_several
        gen.params = dataclasses.replace(
            gen.params, max_tokens=gen.params.max_tokens - len(ids),
            min_tokens=max(0, gen.params.min_tokens - len(ids)),
            bad_words=chat_mcq.other_conclusions(
                result.answer, result.option, len(gen.mcq_question.options),
                lambda text: self.engine.tokenizer.encode(text, add_special_tokens=False))
            if keep else [])
        gen.answer_prefix, gen.answer_prefix_ids = opening, ids
        gen.extra_params["mcq"] = {"id": result.id, "answer": result.answer, "confidence": round(result.confidence, 4),
                                   "method": result.method, "keep_answer": keep}

    def stop_token_ids(self, ids: list[int]) -> list[int]:
        vocabulary = len(self.engine.tokenizer)
        if unknown := [i for i in ids if i >= vocabulary]:
            raise APIError(400, f"`stop_token_ids` holds ids outside the vocabulary of {vocabulary}: {unknown[:5]}",
                           param="stop_token_ids")
        return ids

    def never_ran(self, gen: GenerationRequest) -> None:
        """Logs a request whose answer never started (its client left while it was screened and tokenized, or the
        server shut down, and the stream was closed before its first step): an aborted row, so nothing admitted is
        missing from the log."""
        if not gen.ran:
            gen.ran = True
            self.log.record(gen.record(self.model_name, "aborted", self.why_aborted(started=False),
                                       model_revision=self.model_revision))

    def why_aborted(self, started: bool) -> str:
        """An aborted row's error. Past the drain, uvicorn cancels what is left: then the server ended it, not the
        student (who may also have left during the drain: the row cannot tell which)."""
        when = "finished" if started else "started"
        if self.admission.draining:
            return f"the server was shutting down before the answer {when} (or the client left)"
        return f"the client left before the answer {when}"

    async def run_to_end(self, gen: GenerationRequest) -> None:
        async with aclosing(self.run(gen)) as outputs:
            async for _ in outputs:
                pass

    async def complete(self, gen: GenerationRequest, top_logprobs: int | None) -> ChatCompletionResponse:
        await self.run_to_end(gen)
        with_logprobs = gen.params.logprobs is not None
        if with_logprobs:  # n answers x tokens x 20 alternatives: seconds of objects, built off the event loop
            return await asyncio.to_thread(self._completed, gen, top_logprobs)
        return self._completed(gen, top_logprobs)

    def _completed(self, gen: GenerationRequest, top_logprobs: int | None) -> ChatCompletionResponse:
        with_logprobs = gen.params.logprobs is not None
        return ChatCompletionResponse(
            id=gen.request_id, created=gen.created, model=self.model_name,
            choices=[
                ChatCompletionChoice(
                    index=i, message=ChatMessageOut(content=gen.text(i)),
                    logprobs=_choice_logprobs(gen.logprobs.get(i, []), top_logprobs) if with_logprobs else None,
                    finish_reason=gen.finish_reasons.get(i),
                )
                for i in range(gen.params.n)
            ],
            usage=gen.usage(),
        )

    def first_text_sent(self, gen: GenerationRequest) -> None:
        """A stream sent its first answer text (the tutor's opening counts; the echoed prompt and the guard's
        refusal do not): what a student waits for, which the answer screen moves to the first judged sentence."""
        if gen.first_text_at is None and gen.withheld is None:
            gen.first_text_at = time.perf_counter()
            self.metrics.time_to_first_text.labels(gen.route).observe(gen.first_text_at - gen.started)

    def stream(self, gen: GenerationRequest, include_usage: bool, top_logprobs: int | None) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format (ChatCompletionChunk), ending with `data: [DONE]`."""
        with_logprobs = gen.params.logprobs is not None

        def event(choices: list[ChatCompletionChunkChoice], usage: Usage | None = None) -> str:
            return sse(ChatCompletionChunk(id=gen.request_id, created=gen.created, model=self.model_name,
                                           choices=choices, usage=usage))

        role = one_choice_each(event, [ChatCompletionChunkChoice(index=i, delta=ChatDelta(role="assistant",
                                                                                         content=""))
                                       for i in range(gen.params.n)])

        async def chunks() -> AsyncIterator[str]:
            # The role chunk goes with the first output, as `vllm serve` sends it: clients (vLLM's own benchmark
            # among them) time the first token by the first chunk, which sent at once measured only the headers.
            role_sent = opening_sent = False
            async with aclosing(self.run(gen)) as outputs:
                async for out in outputs:
                    if not role_sent:
                        role_sent = True
                        yield role
                    if gen.answer_prefix and not opening_sent:  # written by run() (open_answer) before any token
                        opening_sent = True
                        self.first_text_sent(gen)
                        yield one_choice_each(event, [
                            ChatCompletionChunkChoice(index=i, delta=ChatDelta(content=gen.answer_prefix))
                            for i in range(gen.params.n)])
                    choices = [
                        ChatCompletionChunkChoice(
                            index=c.index,
                            delta=ChatDelta(content=c.text) if c.text or not c.finish_reason else ChatDelta(),
                            logprobs=_choice_logprobs(c.logprobs or [], top_logprobs) if with_logprobs else None,
                            finish_reason=c.finish_reason,
                        )
                        # A token whose text is still held back (a stop string may be starting, a character is
                        # incomplete) still carries its log-probability, as in the answer that is not streamed.
                        for c in out.choices if c.text or c.finish_reason or (with_logprobs and c.logprobs)
                    ]
                    if choices:
                        if any(c.delta.content for c in choices):
                            self.first_text_sent(gen)
                        yield one_choice_each(event, choices)
            if not role_sent:  # a run that ended without an output still answers as an assistant
                yield role

        return event_stream(chunks(), (lambda: event([], gen.usage())) if include_usage else None,
                            self.metrics.stream_failed(gen.route))

    # MCQ ------------------------------------------------------------------------------------------------

    def letter_ids(self, count: int, leading_space: bool) -> list[int]:
        key = (count, leading_space)
        if key not in self._letter_ids:
            self._letter_ids[key] = mcq.letter_token_ids(self.engine.tokenizer, count, leading_space)
        return self._letter_ids[key]

    def build_question(self, body: MCQRequest, param_prefix: str = "") -> mcq.MCQuestion:
        try:
            q = mcq.MCQuestion.build(body.question, body.options, body.support)
        except mcq.MCQFormatError as exc:
            raise APIError(400, f"{param_prefix}{exc}", param=f"{param_prefix}{exc.param or 'options'}") from exc
        self.check_prompt_chars(len(q.question) + sum(len(o) for o in q.options) + len(q.support or ""),
                                f"{param_prefix}{q.longest_part}")
        return q

    def mcq_prompts(self, q: mcq.MCQuestion, method: str) -> tuple[list[int], list[tuple[list[int], int]]]:
        """The prompts a method scores, each checked as the engine would refuse it (blocking: tokenizes, so call it
        off the loop): the letter prompt (empty when the plan reads no letter), then the options' cloze requests and
        (for cloze_pmi) their answer-prior requests."""
        plan = mcq.plan(method, self.calibration)
        explain = method == "explain"
        tokenizer = self.engine.tokenizer
        if explain:  # the model writes after this prompt: a forged turn would steer what it writes
            for name, text in (("question", q.question), *((f"options[{i}]", o) for i, o in enumerate(q.options)),
                               ("support", q.support or "")):
                self.check_control_tokens(text, name)
        letter_prompt = mcq.encode_prompt(tokenizer, q, explain=explain) if plan.needs_letter else []
        cloze_requests = ((mcq.cloze_requests(tokenizer, q, plan.demonstrations) if plan.needs_cloze else [])
                          + (mcq.answer_prior_requests(tokenizer, q, plan.answer_prior_context, plan.demonstrations)
                             if plan.needs_answer_prior else []))
        where = q.longest_part
        self.check_prompt_length(letter_prompt, where)
        for ids, _ in cloze_requests:
            try:
                self.check_prompt_length(ids, where)
            except APIError as exc:
                # The record's solved examples come first, which the client cannot shorten: said where the question
                # would fit without them.
                shown = len(tokenizer.encode(plan.demonstrations, add_special_tokens=False)) \
                    if plan.demonstrations else 0
                if shown and len(ids) - shown <= self.max_prompt_tokens:
                    exc.message += (f"; {shown} of those tokens are the solved examples the model's calibration "
                                    "puts before every scored question (`method: letter` scores without them)")
                raise
        if explain:
            self.explain_budget(letter_prompt)  # a question too long to explain is a 400, whatever the guard says
        return letter_prompt, cloze_requests

    async def answer_mcq(self, q: mcq.MCQuestion, method: str, principal: Principal, request_id: str,
                         user: str | None = None, min_confidence: float | None = None,
                         param_prefix: str = "",
                         domain: Callable[[], Awaitable[list[float]]] | None = None,
                         prompts: tuple[list[int], list[tuple[list[int], int]]] | None = None,
                         gauge: RequestGauge | None = None) -> MCQResponse:
        """Scores the options as the method says (the letter, the options' texts, or both at once), turns the
        scores into probabilities over exactly the options, and answers null below `min_confidence`. `domain`:
        the question's domain where a batch embeds its questions together (else embedded here, if the plan reads
        it); `prompts`: what `mcq_prompts` made of it, where a batch checked every question before admission;
        `gauge`: the chat's, where a chat pasted the question (else the question is one request of its own)."""
        plan = mcq.plan(method, self.calibration)
        explain = method == "explain"
        floor = self.settings.mcq_min_confidence if min_confidence is None else min_confidence
        row = GenerationRequest(
            request_id=request_id, route="mcq", messages=mcq.render_messages(q, explain), prompt_ids=[],
            principal=principal, user=user, params=GenParams(max_tokens=1, temperature=0.0),
            extra_params={"method": plan.method, "requested_method": method, "calibrated": plan.calibrated,
                          "min_confidence": floor},
        )

        explanation, refusal, withheld = None, None, None
        status, error = "error", None
        scores = mcq.OptionScores()
        own_gauge = gauge is None
        row.gauge = RequestGauge(self.metrics, "mcq") if own_gauge else gauge
        try:  # from the first await: a client gone while the prompts are encoded is logged too
            # Everything a request could refuse is checked before the engine sees any of it (off the loop that
            # streams answers).
            letter_prompt, cloze_requests = prompts if prompts is not None else await asyncio.to_thread(
                self.mcq_prompts, q, method)
            row.prompt_ids = letter_prompt or (cloze_requests[0][0] if cloze_requests else [])
            if explain:
                # `explain` answers with the model's own reasoning: the guard reads the question first (the other
                # methods answer one of the client's options, nothing the model writes); a short stem alone too,
                # since a list of short options dilutes what it asks (a long one is read by sentence anyway).
                whole = "\n".join([q.support or "", q.question, *q.options])
                # The phrases read the student's question, not the support passage or the options it offers.
                refusal = await self.flagged([whole, q.question] if len(q.question) <= WINDOW_CHARS else [whole],
                                             phrases_in={q.question})
            if refusal is not None:  # no answer, and the guard's reply for the reasoning
                row.extra_params["safety"] = refusal.logged
                probabilities, answer = dict.fromkeys(q.letters, 1 / len(q.letters)), None
                explanation = REPLIES[refusal.category]
            else:
                scores, explanation = await self._scores(q, plan, letter_prompt, explain, cloze_requests, row,
                                                         domain)
                withheld = row.extra_params.get("answer_safety", {}).get("0")
                probabilities, answer = (dict.fromkeys(q.letters, 1 / len(q.letters)), None) if withheld else \
                    plan.distribution(scores, q.letters)
            status = "ok"
        except APIError as exc:
            error = exc.message
            in_question(exc, param_prefix)
            raise
        except asyncio.CancelledError:
            status, error = "aborted", "cancelled"
            raise
        except Exception as exc:  # a fault of ours or the engine's (a 500): the row still says what happened
            error = failure_text(exc)
            raise
        finally:  # one row per MCQ request, however it ended
            if own_gauge:
                row.gauge.done()
            if status != "ok":
                probabilities, answer = {}, None
            confidence = max(probabilities.values(), default=0.0)
            abstained = status == "ok" and (refusal is not None or withheld is not None
                                            or (floor is not None and confidence < floor))
            content = "(abstained)" if abstained else (answer or "")
            if explain:
                content = f"{explanation or ''}{mcq.FINAL_ANSWER_CUE} {content}"
            self.log.record(row.record(self.model_name, status, error, model_revision=self.model_revision, response=[{
                "index": 0, "content": content, "answer": None if abstained else answer,
                "probabilities": probabilities, "confidence": confidence, "abstained": abstained,
                "scores": {k: v for k, v in vars(scores).items() if v is not None},
            }]))
        if abstained:
            answer = None
        self.metrics.mcq_answers.labels(answer or "abstained").inc()
        if refusal is not None:
            self.metrics.safety_refusals.labels("mcq", refusal.category).inc()
        if withheld is not None:
            self.metrics.safety_withheld_answers.labels("mcq", withheld["category"]).inc()
        cloze = None
        if scores.cloze is not None:
            cloze = ClozeScores(loglikelihood=dict(zip(q.letters, scores.cloze, strict=True)),
                                per_char=dict(zip(q.letters, scores.cloze_norm, strict=True)),
                                answer_prior=dict(zip(q.letters, scores.answer_prior, strict=True))
                                if scores.answer_prior else None)
        return MCQResponse(id=request_id, answer=answer, option=q.option_for(answer) if answer else None,
                           probabilities=probabilities, confidence=confidence, abstained=abstained,
                           method=plan.method, calibrated=plan.calibrated, cloze=cloze,
                           explanation=explanation, model=self.model_name)

    async def _scores(self, q: mcq.MCQuestion, plan: mcq.Plan, letter_prompt: list[int], explain: bool,
                      cloze_requests: list[tuple[list[int], int]], row: GenerationRequest,
                      shared_domain: Callable[[], Awaitable[list[float]]] | None = None,
                      ) -> tuple[mcq.OptionScores, str | None]:
        """The per-option scores the plan reads; letter and cloze run at once when it reads both."""
        letter, cloze, domain = None, None, None
        try:
            async with asyncio.TaskGroup() as group:
                if plan.needs_letter:
                    letter = group.create_task(self._letter(q, letter_prompt, explain, row))
                if plan.needs_cloze:
                    cloze = group.create_task(self._cloze(cloze_requests, row))
                if plan.needs_domain:  # on the encoder's thread while the engine scores
                    domain = group.create_task(shared_domain() if shared_domain is not None
                                               else self._question_domain(q))
        except* Exception as failures:
            raise first_failure(failures) from None
        support = q.support is not None
        scores, prior = mcq.OptionScores(support=support), None
        if cloze:
            values = cloze.result()
            scores = mcq.cloze_scores(q.options, values[:len(q.options)], support)
            prior = values[len(q.options):] or None
        letter_logprobs, explanation = letter.result() if letter else (None, None)
        return dataclasses.replace(scores, letter=letter_logprobs, answer_prior=prior,
                                   domain=domain.result() if domain else None), explanation

    async def _question_domain(self, q: mcq.MCQuestion) -> list[float]:
        return (await self._question_domains([q]))[0]

    async def _question_domains(self, questions: list[mcq.MCQuestion]) -> list[list[float]]:
        """Which set each question reads like: the record's head over their all-MiniLM-L6-v2 embeddings, on the
        encoder's thread a few questions a call: fewer calls than one per question, while the guard's work queued
        meanwhile runs between them, and a batch cancelled (a 400, a client gone) leaves the rest unqueued."""
        head = self.calibration.question_domain if self.calibration else None
        assert head is not None  # MCQCalibration refuses domain features without their head
        domains: list[list[float]] = []
        for start in range(0, len(questions), DOMAIN_CHUNK):
            domains += await self.on_encoder("question_domain", head.read, self.encoder,
                                             questions[start:start + DOMAIN_CHUNK])
        return domains

    async def _letter(self, q: mcq.MCQuestion, prompt_ids: list[int], explain: bool,
                      row: GenerationRequest) -> tuple[list[float] | None, str | None]:
        """The constrained letter's log-probabilities, renormalized over the options (after reasoning with
        `explain`), and the reasoning; no log-probabilities where the guard stopped the reasoning."""
        tokenizer = self.engine.tokenizer
        letter_ids = self.letter_ids(len(q.options), leading_space=explain)
        final = GenerationRequest(
            request_id=f"{row.request_id}-letter", route="mcq", messages=row.messages, prompt_ids=prompt_ids,
            principal=row.principal, params=GenParams(max_tokens=1, temperature=0.0, allowed_token_ids=letter_ids,
                                                      logprob_token_ids=letter_ids), gauge=row.gauge,
        )
        explanation = None
        if explain:
            reasoning = await self._reason(q, prompt_ids, final)
            explanation = reasoning.text().strip()
            if withheld := reasoning.extra_params.get("answer_safety"):
                # The guard stopped the reasoning: no letter after it; the question is abstained on, as a refused one.
                row.extra_params["answer_safety"] = withheld
                row.token_counts = {0: reasoning.completion_tokens}
                return None, explanation
            # The row counts the question as its prompt and the reasoning, then the letter, as its answer.
            row.params = dataclasses.replace(row.params, max_tokens=reasoning.params.max_tokens + 1)
            row.token_counts = {0: reasoning.completion_tokens}
            final.prompt_ids = mcq.encode_prompt(tokenizer, q, explain=True, reasoning=explanation)
            self.check_prompt_length(final.prompt_ids, "question")
        await self.run_to_end(final)
        if explain:
            row.token_counts[0] += 1
        row.first_token_at = final.first_token_at
        entries = final.logprobs.get(0) or []
        requested = entries[0].requested if entries else {}
        if not set(letter_ids) <= set(requested):
            # as cloze answers it: a letter the engine gave no log-probability for was served as impossible (its
            # favourite, when that one was missing), and none at all was a 500
            raise APIError(503, "the engine returned no log-probability for an option's letter; retry",
                           code="engine_unavailable")
        return mcq.log_softmax([requested[tid] for tid in letter_ids]), explanation

    async def _cloze(self, requests: list[tuple[list[int], int]], row: GenerationRequest) -> list[float]:
        """Each option's log-likelihood as the question's continuation. The options are sent together, so they
        may share the question's KV blocks from vLLM's prefix cache; a hit that reached into an option's own
        continuation is completed by the rule of mcq.continuation_positions_missing, as in process
        (offline.engine.generate_reading_cache), so both score the same."""

        async def score(index: int, prompt_ids: list[int], context_length: int, use_cache: bool) -> tuple[int, float]:
            """How many leading continuation log-probabilities the request lacks, and the sum of the rest."""
            gen = GenerationRequest(
                request_id=f"{row.request_id}-cloze{index}{'' if use_cache else 'r'}", route="mcq",
                messages=row.messages, prompt_ids=prompt_ids, principal=row.principal,
                params=GenParams(max_tokens=1, temperature=0.0, prompt_logprobs=True,
                                 skip_reading_prefix_cache=not use_cache), gauge=row.gauge,
            )
            await self.run_to_end(gen)
            missing = mcq.continuation_positions_missing(gen.num_cached_tokens, context_length)
            values = (gen.prompt_logprobs or [])[context_length + missing:len(prompt_ids)]
            if len(values) != len(prompt_ids) - context_length - missing or any(v is None for v in values):
                raise APIError(503, "the engine returned no log-probabilities for an option; retry",
                               code="engine_unavailable")
            return missing, float(sum(values))

        async def next_token(index: int, context: tuple[int, ...], token_ids: list[int]) -> dict[int, float]:
            gen = GenerationRequest(
                request_id=f"{row.request_id}-clozectx{index}", route="mcq", messages=row.messages,
                prompt_ids=list(context), principal=row.principal,
                params=GenParams(max_tokens=1, temperature=0.0, logprob_token_ids=token_ids,
                                 skip_reading_prefix_cache=False), gauge=row.gauge,
            )
            await self.run_to_end(gen)
            entries = gen.logprobs.get(0) or []
            requested = entries[0].requested if entries else {}
            if set(requested) != set(token_ids):
                raise APIError(503, "the engine returned no log-probabilities for an option; retry",
                               code="engine_unavailable")
            return requested

        [scored] = await together([score(i, ids, n, True) for i, (ids, n) in enumerate(requests)])
        missing = [lacking for lacking, _ in scored]
        rescore = [i for i, lacking in enumerate(missing) if lacking > 1]
        wanted = mcq.first_tokens_by_context(requests, missing)
        # Independent of each other: the rescored options and the context requests go to the engine together.
        again, firsts = await together(
            [score(i, *requests[i], False) for i in rescore],
            [next_token(i, context, tokens) for i, (context, tokens) in enumerate(wanted.items())])
        for i, value in zip(rescore, again, strict=True):
            scored[i] = value
        found = dict(zip(wanted, firsts, strict=True))
        return [rest + (found[tuple(ids[:n])][ids[n]] if lacking == 1 else 0.0)
                for (ids, n), lacking, (_, rest) in zip(requests, missing, scored, strict=True)]

    def explain_budget(self, prompt_ids: list[int]) -> int:
        """How many tokens of reasoning fit after this question with the answer cue still within the prompt limit;
        a 400 naming `explain` when none do."""
        budget = mcq.explain_budget(len(prompt_ids), self.engine.max_model_len, self.max_prompt_tokens,
                                    self.settings.mcq_explain_max_tokens)
        if budget < 1:
            raise APIError(400, "the question leaves no room for an explanation within the prompt limit; "
                                "shorten it or ask without `explain`", param="explain", code="context_length_exceeded")
        return budget

    async def _reason(self, q: mcq.MCQuestion, prompt_ids: list[int], final: GenerationRequest) -> GenerationRequest:
        """The tutor's reasoning (its text(), greedy), sized so that reasoning + answer cue still fit the prompt
        limit."""
        budget = self.explain_budget(prompt_ids)
        reasoning = GenerationRequest(
            request_id=f"{final.request_id}-reasoning", route="mcq", messages=final.messages, prompt_ids=prompt_ids,
            principal=final.principal, params=GenParams(max_tokens=budget, temperature=0.0,
                                                        stop=mcq.EXPLAIN_STOP),
            screen_answer=True, gauge=final.gauge,
        )
        await self.run_to_end(reasoning)
        return reasoning

    async def mcq_batch_prompts(self, items: list[tuple[mcq.MCQuestion, MCQRequest]],
                                ) -> list[tuple[list[int], list[tuple[list[int], int]]]]:
        """Every question's prompts, checked, before the batch is admitted: one question over the token limit is a
        400 that costs the batch no engine work and no budget (off the loop that streams answers)."""
        def encode_all() -> list[tuple[list[int], list[tuple[list[int], int]]]]:
            made = []
            for i, (q, body) in enumerate(items):
                try:
                    made.append(self.mcq_prompts(q, body.resolved_method))
                except APIError as exc:
                    in_question(exc, f"questions[{i}].")
                    raise
            return made

        return await asyncio.to_thread(encode_all)

    async def answer_mcq_batch(self, items: list[tuple[mcq.MCQuestion, MCQRequest]], principal: Principal,
                               batch_id: str,
                               prompts: list[tuple[list[int], list[tuple[list[int], int]]]] | None = None,
                               ) -> list[MCQResponse]:
        """All questions at once; the first failure cancels the rest (each still logs its row) and is raised. The
        questions whose method reads the question's domain are embedded together, once. `prompts`: what
        `mcq_batch_prompts` made of them."""
        reading = {i: k for k, i in enumerate(i for i, (_, body) in enumerate(items)
                                              if mcq.plan(body.resolved_method, self.calibration).needs_domain)}
        try:
            async with asyncio.TaskGroup() as group:
                domains = group.create_task(self._question_domains([items[i][0] for i in reading])) \
                    if reading else None

                def domain_of(i: int) -> Callable[[], Awaitable[list[float]]] | None:
                    return functools.partial(_item, domains, reading[i]) if i in reading else None

                tasks = [group.create_task(self.answer_mcq(q, body.resolved_method, principal, f"{batch_id}-{i}",
                                                           body.user, body.min_confidence, f"questions[{i}].",
                                                           domain_of(i), prompts[i] if prompts else None))
                         for i, (q, body) in enumerate(items)]
        except* Exception as failures:
            raise first_failure(failures) from None
        return [task.result() for task in tasks]


async def together(*groups: list[Coroutine[Any, Any, T]]) -> list[list[T]]:
    """Every group's results in order, all run at once. The first failure cancels the rest and is raised alone:
    `asyncio.gather` raised it and left its siblings running in the engine, uncounted by admission."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [[group.create_task(coro) for coro in coros] for coros in groups]
    except* Exception as failures:
        raise first_failure(failures) from None
    return [[task.result() for task in row] for row in tasks]


def first_failure(failures: BaseExceptionGroup) -> BaseException:
    """Of a task group's failures (flattened: a task may raise a group of its own), the client's error first, else
    the fault itself, raised as a single request's would be (two clauses of `except*` each raising made an
    ExceptionGroup of their two: a 500 whose log row named neither)."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [failures]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = exc.exceptions
        else:
            leaves.append(exc)
    return next((e for e in leaves if isinstance(e, APIError)), leaves[0])


def in_question(exc: APIError, param_prefix: str) -> None:
    """Makes the error name the batch's question it is about (`questions[3].explain`); a single question's stays."""
    if param_prefix and exc.param and not exc.param.startswith(param_prefix):
        exc.param = param_prefix + exc.param


async def _item(shared: asyncio.Task[list[list[float]]], index: int) -> list[float]:
    # shielded: one question cancelled (its client gone, or its own failure) must not cancel its batch's embedding
    return (await asyncio.shield(shared))[index]


def _choice_logprobs(entries: list[TokenLogprob], top: int | None) -> ChoiceLogprobs:
    def item(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

    return ChoiceLogprobs(content=[
        TokenLogprobEntry(token=e.token, logprob=e.logprob, bytes=list(e.token.encode("utf-8")),
                          top_logprobs=[item(text, lp) for _, text, lp in e.top[: top or 0]])
        for e in entries
    ])
