"""Requests that mean one thing: a JSON key or a query parameter sent twice is refused, not settled by taking the
last value, since a gateway or log that reads the first would see another request than the one answered."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from service.errors import APIError

# No route takes more than a handful: a bound, as every input has one.
MAX_QUERY_PARAMETERS = 64


def _first_repeated(names: list[str]) -> str | None:
    """One pass: scanning the names before each (quadratic) held the event loop for seconds on a 64 KB query,
    before any key was checked."""
    seen: set[str] = set()
    return next((name for name in names if name in seen or seen.add(name)), None)


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    body = dict(pairs)
    if len(body) != len(pairs):
        twice = _first_repeated([key for key, _ in pairs])
        # A decode error: FastAPI makes it the usual 400 ("request body is not valid JSON: ...").
        raise json.JSONDecodeError(f"key `{twice}` appears twice in one object; send each field once", "", 0)
    return body


# A body this large is parsed on a worker thread: a megabyte of small JSON objects holds the event loop, which
# streams every student's answer, for about 0.1 s.
PARSE_OFF_LOOP_BYTES = 64 * 1024


class UnambiguousJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            parse = functools.partial(json.loads, body, object_pairs_hook=_refuse_duplicates)
            self._json = await asyncio.to_thread(parse) if len(body) > PARSE_OFF_LOOP_BYTES else parse()
        return self._json


def _gates(dependant: Dependant) -> list[Callable[[Request], Awaitable[Any]]]:
    """The route's credential checks (`service.auth.require`'s dependencies, marked `checks_credentials`)."""
    found = [d.call for d in dependant.dependencies if getattr(d.call, "checks_credentials", False)]
    return found + [gate for d in dependant.dependencies for gate in _gates(d)]


class UnambiguousJSONRoute(APIRoute):
    """A route whose query has each parameter once and whose JSON body is read by UnambiguousJSONRequest
    (FastAPI's custom request class pattern)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        gates = _gates(self.dependant)

        async def unambiguous(request: Request) -> Response:
            names = [name for name, _ in request.query_params.multi_items()]
            if len(names) > MAX_QUERY_PARAMETERS:
                raise APIError(400, f"the query has {len(names)} parameters; this API takes at most "
                                    f"{MAX_QUERY_PARAMETERS}")
            if (twice := _first_repeated(names)) is not None:
                raise APIError(400, f"query parameter `{twice}` appears twice; send it once", param=twice)
            request = UnambiguousJSONRequest(request.scope, request.receive)
            # Credentials before the body: FastAPI parses it before any dependency runs, so a request without a
            # key (never counted against its address) could have the loop parse a megabyte of JSON every time.
            for gate in gates:
                await gate(request)
            return await handler(request)

        return unambiguous
