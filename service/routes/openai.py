"""OpenAI-compatible routes: /v1/models, /v1/chat/completions and /v1/completions."""

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from service.auth import Principal, admissible, admitted, require
from service.completions import complete, prepare_completion, stream
from service.disconnect import until_disconnected
from service.errors import APIError
from service.generation import GenerationRequest
from service.jsonbody import UnambiguousJSONRoute
from service.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from service.tutor import AdmissionSlot

router = APIRouter(prefix="/v1", tags=["openai"], route_class=UnambiguousJSONRoute)
any_role = require("student", "reviewer")


def served_model_card(request: Request) -> ModelCard:
    tutor = request.app.state.tutor
    entry = request.app.state.registry_entry
    return ModelCard(
        id=tutor.model_name, created=int(entry.manifest.created_at_utc.timestamp()), parent=entry.manifest.parent,
        method=entry.manifest.method, max_model_len=tutor.engine.max_model_len, revision=entry.manifest.revision,
        mcq_calibrated_at=record.created_at.isoformat() if (record := entry.manifest.mcq_calibration) else None,
    )


@router.get("/models", response_model=ModelList)
async def list_models(request: Request, _: Principal = Depends(any_role)) -> ModelList:
    return ModelList(data=[served_model_card(request)])


@router.get("/models/{model}", response_model=ModelCard, responses={404: {"description": "not served here"}})
async def retrieve_model(request: Request, model: Annotated[str, Path(max_length=256)],
                         _: Principal = Depends(any_role)) -> ModelCard:
    """The served model's card (`client.models.retrieve(name)`); any other name is a 404 `model_not_found`."""
    request.app.state.tutor.check_model(model)
    return served_model_card(request)


# The OpenAPI schema documents the streams too: each server-sent event's data is a ChatCompletionChunk, or a
# CompletionResponse (the shape FastAPI gives its own SSE routes; `document_stream` adds the chunk's schema to
# the components).
def stream_response(what: str, chunk: str) -> dict:
    return {200: {
        "description": f"{what}; with `stream: true`, server-sent events ending with `data: [DONE]`",
        "content": {"text/event-stream": {"itemSchema": {
            "type": "object", "required": ["data"],
            "properties": {"data": {"type": "string", "contentMediaType": "application/json",
                                    "contentSchema": {"$ref": f"#/components/schemas/{chunk}"}}},
        }}},
    }}


def document_stream(openapi: dict) -> None:
    """Adds ChatCompletionChunk (and the models it uses) to an OpenAPI schema's components."""
    from pydantic.json_schema import models_json_schema

    _, schema = models_json_schema([(ChatCompletionChunk, "serialization")],
                                   ref_template="#/components/schemas/{model}")
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in schema.get("$defs", {}).items():
        schemas.setdefault(name, definition)


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses=stream_response("A chat completion", "ChatCompletionChunk"))
async def chat_completions(body: ChatCompletionRequest, request: Request, principal: Principal = Depends(any_role)):
    tutor = request.app.state.tutor
    review_requested = review_header(request)
    if review_requested and body.n > 1 and tutor.settings.review_policy != "off":
        # A review item is one answer beside another: which of n would reviewers judge?
        raise APIError(400, f"X-Zephyr-Review marks one answer for review; this request asks for n={body.n}. Send "
                            "n=1 to have it reviewed, or leave the header out", param="n")
    # What can never succeed is refused before admission, whose 503 or 429 a client would retry first.
    tutor.check_generation(body, tutor.settings.chat_temperature)
    # n answers are n sequences in the engine: n places of admission, and n units of the key's budget; a chat
    # marked for review (where the policy takes marks) must fit the review budget too
    marked = review_requested and tutor.candidates.wants_review(True)
    with admissible(request, body.n, weight=body.n, for_review=marked):  # around the tokenizing and the guard
        gen = await tutor.prepare_chat(body, principal, review_requested=review_requested)
    top_logprobs = body.top_logprobs if body.logprobs else None
    # Each chat marked for review costs a second answer and a reviewer's time: a budget per key. Counted only when
    # the mark takes effect (`for_review`: review_policy is not "off"); a chat the sampler picked costs the key none.
    reviewed = review_requested and gen.for_review
    with admitted(request, body.n, weight=body.n, for_review=reviewed) as slot:
        return await answer(request, slot, gen, body.stream, lambda: tutor.complete(gen, top_logprobs),
                            lambda: tutor.stream(gen, body.include_usage, top_logprobs))


@router.post("/completions", response_model=CompletionResponse,
             responses=stream_response("A completion (OpenAI's legacy completions)", "CompletionResponse"))
async def completions(body: CompletionRequest, request: Request, principal: Principal = Depends(any_role)):
    """A raw prompt (text or token ids) continued without the chat template; with `echo` and `logprobs`, the
    prompt tokens' log-probabilities (what lm-eval's `local-completions` model reads for log-likelihood tasks)."""
    tutor = request.app.state.tutor
    tutor.check_generation(body)  # what can never succeed, before admission's retryable refusals
    with admissible(request, body.n, weight=body.n):  # around the tokenizing and the guard's screening
        job = await prepare_completion(tutor, body, principal)
    with admitted(request, body.n, weight=body.n) as slot:
        return await answer(request, slot, job.gen, body.stream, lambda: complete(tutor, job),
                            lambda: stream(tutor, job, body.include_usage))


async def answer(request: Request, slot: AdmissionSlot, gen: GenerationRequest, streamed: bool,
                 whole: Callable[[], Coroutine[Any, Any, Any]], events: Callable[[], AsyncIterator[str]]):
    """One generation admitted in `slot`, answered whole (a response model as JSON) or as server-sent events; its
    row is written however it ends, even when its answer never started."""
    tutor = request.app.state.tutor
    headers = {"X-Request-Id": gen.request_id}
    if not streamed:
        try:
            result = await until_disconnected(request, whole())
        except APIError as exc:  # the engine's refusal or absence: its log row has this id, so the error says it
            exc.headers.setdefault("X-Request-Id", gen.request_id)
            raise
        finally:
            tutor.never_ran(gen)
        # Rendered as before (json.dumps, not pydantic's JSON): the same bytes on the wire. An answer with
        # log-probabilities can be tens of megabytes (n=8, 2,000 tokens, 20 alternatives: 22 MB): off the event loop.
        def render() -> JSONResponse:
            return JSONResponse(result.model_dump(mode="json"), headers=headers)

        large = gen.params.logprobs is not None or gen.params.prompt_logprobs
        return await asyncio.to_thread(render) if large else render()
    # Its first event (the role chunk goes with the engine's first output) is read before the headers go out: a
    # failure before it (the engine gone while the request queued, a request vLLM refuses) is answered with its own
    # status, as the answer that is not streamed is; the time to the first token is the same. Made and read before
    # the slot is handed off: a failure here still releases it with the `with`.
    stream = events()
    try:
        first = await until_disconnected(request, _first(stream))
    except BaseException as exc:
        try:
            await stream.aclose()
        finally:
            tutor.never_ran(gen)
        if isinstance(exc, APIError):
            exc.headers.setdefault("X-Request-Id", gen.request_id)
        raise
    release = slot.hand_off()

    def on_close() -> None:
        try:
            tutor.never_ran(gen)
        finally:
            release()

    return ReleasingStreamingResponse(  # the stream holds its place until the response closes
        ReadAhead(first, stream), on_close=on_close, media_type="text/event-stream",
        headers=headers | {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _first(stream: AsyncIterator[str]) -> str:
    return await anext(stream)  # event_stream always ends with [DONE]: never empty


class ReadAhead:
    """A stream whose first event was read ahead: that event, then the rest; closing it closes the stream (which
    aborts the engine request), started or not."""

    def __init__(self, first: str, rest: AsyncIterator[str]) -> None:
        self._first: str | None = first
        self._rest = rest

    def __aiter__(self) -> "ReadAhead":
        return self

    async def __anext__(self) -> str:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await anext(self._rest)

    async def aclose(self) -> None:
        await self._rest.aclose()


REVIEW_HEADER = "X-Zephyr-Review"
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes"), ("0", "false", "no")


def review_header(request: Request) -> bool:
    """`X-Zephyr-Review: true` asks for this chat to go to the human reviewers (with the openai client:
    `extra_headers={"X-Zephyr-Review": "true"}`)."""
    value = request.headers.get(REVIEW_HEADER)
    if value is None:
        return False
    word = value.strip().lower()
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise APIError(400, f"header {REVIEW_HEADER} must be true or false, not {value[:20]!r}",
                       param=REVIEW_HEADER, code="invalid_header")
    return word in TRUE_WORDS


class ReleasingStreamingResponse(StreamingResponse):
    """Closes its generator (aborting the engine request) and runs `on_close` however the response ends,
    including a client gone before the first byte, when Starlette never starts the generator at all."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass  # the client left (ASGI 2.4: its send raised): no server error, and nothing left to send
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self._on_close()
