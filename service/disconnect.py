"""Work that stops when the client hangs up: a student who closes the tab should not keep a long answer
generating, nor hold the places it was admitted to."""

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Request

T = TypeVar("T")

# nginx's status for a request the client closed before the answer: counted apart from the server's own 5xx, so
# closed tabs never page anyone. The client is gone and never sees it.
CLIENT_CLOSED_REQUEST = 499


class ClientGone(Exception):
    """The client hung up before the answer was ready; the work was cancelled (and logged as aborted)."""


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Runs `work`, cancelling it (and so its engine requests) if the client hangs up first; then raises
    ClientGone, which the app answers with CLIENT_CLOSED_REQUEST."""
    task = asyncio.ensure_future(work)

    async def hang_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # This handler is being cancelled (the server stopping past its drain): the work stops too, and is waited
        # for, so that its own cleanup (the log row, the engine request's abort, a stream it was reading) is done
        # before the caller's runs; a caller that closed that stream at once met it still running.
        watcher.cancel()
        task.cancel()
        await asyncio.wait({task})
        raise
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    try:
        return await task  # the answer, or the work's own error; waits for a cancelled task to log its row
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # this handler itself is being cancelled (the server stopping), not the client leaving
        if watcher.done() and not watcher.cancelled() and (failure := watcher.exception()) is not None:
            raise failure from None  # reading the connection failed: that, not a departure
        raise ClientGone from None
