"""One engine request while it runs (`GenerationRequest`), and the log row it becomes (`GenerationRecord`, in
service/store/models.py beside the table it fills). The tutor makes and runs these; review candidates make
them too (service/review/candidates.py), which is why they live in neither."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from service.auth import Principal
from service.engine import EngineOutput, GenParams, TokenLogprob
from service.errors import APIError, error_event
from service.metrics import RequestGauge
from service.protocol import Usage
from service.store.models import GenerationRecord
from zephyr import textquality
from zephyr.mcq import MCQuestion

log = logging.getLogger("zephyr.service")

# Token-id lists are implied by the MCQ options, and a chat's banned phrases by its MCQ answer (params.mcq): the log
# keeps the parameters as the client sent them.
IMPLIED_PARAMS = ("allowed_token_ids", "logprob_token_ids", "bad_words")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(chunk: BaseModel) -> str:
    return f"data: {json.dumps(chunk.model_dump(), ensure_ascii=False)}\n\n"


def one_choice_each(event: Callable[[list[Any]], str], choices: list[Any]) -> str:
    """One chunk per choice, as OpenAI and `vllm serve` stream them: a client reading `choices[0]` of each chunk
    lost the other answers of `n` > 1 when one chunk carried them all."""
    return "".join(event([choice]) for choice in choices)


async def event_stream(events: AsyncGenerator[str, None], usage_event: Callable[[], str] | None,
                       failed: Callable[[int], None]) -> AsyncIterator[str]:
    """OpenAI's stream framing around a route's events: a failure after the headers went out is reported in-band,
    as OpenAI does, and `failed` told its status (the HTTP counter saw the 200 the headers said); the usage event
    (stream_options.include_usage) follows a stream that finished; then [DONE]. A failure before the first event
    is raised: the route reads that event before it sends the headers (routes/openai.py `answer`), so the client
    gets the error's own status (a 503 it retries, a 400), not a 200 with an error in it."""
    started = False
    try:
        async with aclosing(events):  # a client that leaves closes this stream: close the route's at once too
            async for item in events:
                started = True
                yield item
    except APIError as exc:
        if not started:
            raise
        failed(exc.status)
        yield error_event(exc)
    except Exception:  # a fault of ours after the headers went out: said in-band, as a 500 would be, then [DONE]
        if not started:
            raise
        log.exception("a stream failed")
        failed(500)
        yield error_event(APIError(500, "internal error; the server logged it"))
    else:
        if usage_event is not None:
            yield usage_event()
    yield "data: [DONE]\n\n"


@dataclass
class GenerationRequest:
    """One engine request as it runs: accumulated text per choice, timings and the log row it becomes."""

    request_id: str
    route: str
    messages: list[dict[str, Any]]
    prompt_ids: list[int]
    params: GenParams
    principal: Principal
    user: str | None = None
    extra_params: dict[str, Any] = field(default_factory=dict)
    texts: dict[int, list[str]] = field(default_factory=dict)
    token_counts: dict[int, int] = field(default_factory=dict)
    finish_reasons: dict[int, str | None] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    first_token_at: float | None = None
    first_text_at: float | None = None  # when a stream sent its first answer text (Tutor.first_text_sent)
    ran: bool = False  # Tutor.run began: it writes the row however the answer ends (else Tutor.never_ran)
    last_token_at: float | None = None
    steps: int = 0
    prompt_logprobs: list[float | None] | None = None  # GenParams.prompt_logprobs: one per prompt token
    prompt_top: list[list[tuple[int, float]]] | None = None  # GenParams.prompt_top_logprobs (EngineOutput's)
    num_cached_tokens: int = 0
    # Human review (service/review): whether this chat goes to reviewers, and candidate provenance.
    review_requested: bool = False
    for_review: bool = False
    review_kind: str | None = None
    purpose: str = "served"
    # The student request this engine request serves on the waiting/running gauges: its own, made by Tutor.run,
    # or an /mcq question's (or the chat's that pasted it), shared by the engine requests that score its options.
    gauge: RequestGauge | None = None
    parent_id: str | None = None
    answer_shown: bool = True  # false where the client only scores the prompt (completions' `max_tokens: 0`)
    # A multiple-choice question the chat's last message holds (zephyr/chat_mcq.py), and the answer's opening that
    # the tutor wrote from /mcq's answer to it: every choice starts with it, and the engine continues from it.
    mcq_question: MCQuestion | None = None
    mcq_one_of_several: bool = False  # the message holds another question after it
    answer_prefix: str = ""
    answer_prefix_ids: list[int] = field(default_factory=list)
    # The safety guard's reply (zephyr/safety.py) when it flagged the request: every choice is this, not the model's.
    withheld: str | None = None
    # Whether the guard reads the answer as it streams (service/answer_screen.py): what a student reads (a chat, a
    # completion, /mcq's explanation), not what only scores (a prompt's log-probabilities, an option's cloze, the
    # letter). A review candidate is screened as its served answer was (service/review/candidates.py).
    screen_answer: bool = False

    def absorb(self, out: EngineOutput) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.steps += 1
        if out.prompt_logprobs is not None:
            self.prompt_logprobs, self.num_cached_tokens = out.prompt_logprobs, out.num_cached_tokens
            self.prompt_top = out.prompt_top
        for choice in out.choices:
            self.texts.setdefault(choice.index, []).append(choice.text)
            self.token_counts[choice.index] = self.token_counts.get(choice.index, 0) + len(choice.token_ids)
            if choice.logprobs:
                self.logprobs.setdefault(choice.index, []).extend(choice.logprobs)
            if choice.finish_reason is not None:
                self.finish_reasons[choice.index] = choice.finish_reason

    def text(self, index: int = 0) -> str:
        return self.answer_prefix + "".join(self.texts.get(index, []))

    @property
    def engine_prompt_ids(self) -> list[int]:
        """What the engine continues: the prompt, then the answer's opening when the tutor wrote one."""
        return self.prompt_ids + self.answer_prefix_ids

    @property
    def asked_max_tokens(self) -> int:
        """The client's `max_tokens`: the engine's, and the opening the tutor wrote counted in it."""
        return self.params.max_tokens + len(self.answer_prefix_ids)

    def answer_entry(self, index: int, judged: bool) -> dict[str, Any]:
        """One choice as the log keeps it. A finished (`judged`), shown answer also says whether it loops, the rule
        the text suite gates candidates on (`zephyr.textquality`), so reviewers and the live metric see the same
        thing; an answer cut short says nothing, since how it would have gone on is unknown."""
        text = self.text(index)
        entry: dict[str, Any] = {"index": index, "content": text, "finish_reason": self.finish_reasons.get(index)}
        if judged and self.answer_shown:
            share = textquality.repeated_ngram_share(text)
            entry |= {"repeated_4gram_share": round(share, 3), "looping": textquality.is_looping(share)}
        return entry

    @property
    def generated_tokens(self) -> int:
        return sum(self.token_counts.values())

    @property
    def completion_tokens(self) -> int:
        """The answers' tokens, the opening the tutor wrote into each of them included."""
        return self.generated_tokens + len(self.answer_prefix_ids) * self.params.n

    def usage(self) -> Usage:
        prompt = len(self.prompt_ids)
        return Usage(prompt_tokens=prompt, completion_tokens=self.completion_tokens,
                     total_tokens=prompt + self.completion_tokens)

    def logged_params(self) -> dict[str, Any]:
        """The parameters as the client's: an answer's opening written by the tutor counts in its `max_tokens`."""
        params = {k: v for k, v in asdict(self.params).items() if k not in IMPLIED_PARAMS}
        return params | {"max_tokens": self.asked_max_tokens} | self.extra_params

    def record(self, model: str, status: str, error: str | None, response: list[dict[str, Any]] | None = None,
               model_revision: str | None = None) -> GenerationRecord:
        """The log row for this request as it ended (`status` ok, aborted or error); `response` replaces the
        default one entry per choice (MCQ answers log more). `model_revision`: which weights of the model's name
        (zephyr.registry.ModelManifest.revision)."""
        ended = time.perf_counter()
        return GenerationRecord(
            id=self.request_id,
            created_at=datetime.now(UTC),
            route=self.route,
            model=model,
            api_key_hash=self.principal.key_hash,
            role=self.principal.role,
            user=self.user,
            status=status,
            messages=self.messages,
            response=response if response is not None else [
                self.answer_entry(i, judged=status == "ok") for i in range(self.params.n)],
            params=self.logged_params(),
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.completion_tokens,
            ttft_ms=None if self.first_token_at is None else (self.first_token_at - self.started) * 1000,
            latency_ms=(ended - self.started) * 1000,
            error=error,
            review_requested=self.review_requested,
            purpose=self.purpose,
            parent_id=self.parent_id,
            review_kind=self.review_kind,
            model_revision=model_revision,
        )
