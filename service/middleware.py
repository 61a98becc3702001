"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer and slow streaming responses)."""

from __future__ import annotations

import json
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body
from service.metrics import Metrics
from zephyr.settings import is_loopback


async def send_error(send: Send, status: int, message: str, code: str) -> None:
    """An error in OpenAI's body, sent before the app (or instead of it)."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException so FastAPI's body parsing passes it on as a 413."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body over the limit of {max_bytes} bytes (ZEPHYR_MAX_BODY_BYTES)")


class BodySizeLimit:
    """413 for a body over `max_bytes`, by Content-Length or, for chunked uploads, as it arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        await send_error(send, 413, f"request body over the limit of {self.max_bytes} bytes (ZEPHYR_MAX_BODY_BYTES)",
                         "body_too_large")


# Methods counted under their own label; any other verb a client makes up is counted as `other`.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """Counts every response by route template and status, and times it to its last body byte, so a
    streamed response is measured end to end."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"  # a label per made-up verb
            self.metrics.requests.labels(route, method, str(status)).inc()
            if route not in ("/metrics", "/healthz", "/readyz"):
                self.metrics.request_latency.labels(route).observe(time.perf_counter() - started)


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def host_name(host_header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '[::1]'."""
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def origin_host(origin: str) -> str:
    """'http://127.0.0.1:8000' -> '127.0.0.1'; 'null' (a sandboxed frame, a file) -> 'null'."""
    return host_name(origin.split("://", 1)[-1].split("/", 1)[0])


class LoopbackOnly:
    """With no API keys every route is open, so only this machine may talk to the server: the peer must be a
    loopback address, and the Host header must name loopback too, so a web page on another site cannot reach
    it through a DNS name rebound to 127.0.0.1 (DNS rebinding). A page on another site can still send this
    machine's browser to 127.0.0.1 itself (a "simple" POST without a Content-Type needs no CORS preflight, and
    FastAPI reads its body as JSON), so a request a page sent (its Origin, or Sec-Fetch-Site) must come from a
    loopback page too; following a link (a GET navigation) is still allowed."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            headers = dict(scope["headers"])
            host = host_name(headers.get(b"host", b"").decode("latin-1").strip().lower())
            origin = headers.get(b"origin", b"").decode("latin-1").strip().lower()
            fetch_site = headers.get(b"sec-fetch-site", b"").decode("latin-1").strip().lower()
            navigation = scope["method"] in ("GET", "HEAD") and headers.get(b"sec-fetch-mode") == b"navigate"
            problem = None
            if client is None or not is_loopback(client[0]):
                problem = ("this server has no API keys, so it answers only on this machine; set ZEPHYR_API_KEYS "
                           "(or ZEPHYR_API_KEYS_FILE) to serve others")
            elif host not in LOOPBACK_HOSTS:
                problem = (f"this server has no API keys and answers only requests addressed to localhost, not to "
                           f"{host[:64]!r} (DNS rebinding protection); set ZEPHYR_API_KEYS to serve other names")
            elif not navigation and ((origin and origin_host(origin) not in LOOPBACK_HOSTS)
                                     or fetch_site == "cross-site"):
                problem = (f"this server has no API keys and answers only pages on this machine, not one from "
                           f"{(origin or 'another site')[:64]!r} (cross-site request protection); set ZEPHYR_API_KEYS "
                           "to serve other sites")
            if problem is not None:
                await send_error(send, 403, problem, "open_mode_loopback_only")
                return
        await self.app(scope, receive, send)
