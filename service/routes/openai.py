"""OpenAI-compatible routes: /v1/models and /v1/chat/completions."""

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from service.auth import Principal, charge, require
from service.errors import APIError
from service.protocol import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["openai"])
T = TypeVar("T")
any_role = require("student", "reviewer")


@router.get("/models", response_model=ModelList)
async def list_models(request: Request, _: Principal = Depends(any_role)) -> ModelList:
    tutor = request.app.state.tutor
    entry = request.app.state.registry_entry
    return ModelList(data=[ModelCard(
        id=tutor.model_name, created=int(entry.manifest.created_at.timestamp()), parent=entry.manifest.parent,
        method=entry.manifest.method, max_model_len=tutor.engine.max_model_len,
    )])


# The OpenAPI schema documents the stream too: each server-sent event's data is a ChatCompletionChunk (the shape
# FastAPI gives its own SSE routes; `document_stream` adds the chunk's schema to the components).
STREAM_RESPONSE = {200: {
    "description": "A chat completion; with `stream: true`, server-sent events ending with `data: [DONE]`",
    "content": {"text/event-stream": {"itemSchema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "contentMediaType": "application/json",
                                "contentSchema": {"$ref": "#/components/schemas/ChatCompletionChunk"}}},
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


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAM_RESPONSE)
async def chat_completions(body: ChatCompletionRequest, request: Request, principal: Principal = Depends(any_role)):
    tutor = request.app.state.tutor
    review_requested = review_header(request)
    gen = await tutor.prepare_chat(body, principal, review_requested=review_requested)
    charge(request, body.n)  # n answers are n times the work
    if review_requested:  # each marked chat costs a second answer and a reviewer's time: a budget per key
        request.app.state.review_requests.hit(principal.identity)
    headers = {"X-Request-Id": gen.request_id}
    top_logprobs = body.top_logprobs if body.logprobs else None
    with tutor.admission.admit() as slot:
        if not body.stream:
            result = await until_disconnected(request, tutor.complete(gen, top_logprobs))
            # Rendered as before (json.dumps, not pydantic's JSON): the same bytes on the wire.
            return JSONResponse(result.model_dump(mode="json"), headers=headers)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return ReleasingStreamingResponse(  # the stream holds its place until the response closes
            tutor.stream(gen, include_usage, top_logprobs), on_close=slot.hand_off(),
            media_type="text/event-stream", headers=headers | {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


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


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Runs `work`, cancelling it (and so the engine request) if the client hangs up first: a student who
    closes the tab should not keep a long answer generating."""
    task = asyncio.ensure_future(work)

    async def hang_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return await task  # raises CancelledError when the client left: nobody is waiting for a response


class ReleasingStreamingResponse(StreamingResponse):
    """Closes its generator (aborting the engine request) and runs `on_close` however the response ends,
    including a client gone before the first byte, when Starlette never starts the generator at all."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self._on_close()
