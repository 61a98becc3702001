"""Requests that mean one thing: a JSON key or a query parameter sent twice is refused, not settled by taking the
last value, since a gateway or log that reads the first would see another request than the one answered."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
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


class UnambiguousJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=_refuse_duplicates)
        return self._json


class UnambiguousJSONRoute(APIRoute):
    """A route whose query has each parameter once and whose JSON body is read by UnambiguousJSONRequest
    (FastAPI's custom request class pattern)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def unambiguous(request: Request) -> Response:
            names = [name for name, _ in request.query_params.multi_items()]
            if len(names) > MAX_QUERY_PARAMETERS:
                raise APIError(400, f"the query has {len(names)} parameters; this API takes at most "
                                    f"{MAX_QUERY_PARAMETERS}")
            if (twice := _first_repeated(names)) is not None:
                raise APIError(400, f"query parameter `{twice}` appears twice; send it once", param=twice)
            return await handler(UnambiguousJSONRequest(request.scope, request.receive))

        return unambiguous
