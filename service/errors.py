"""Every error leaves the server in OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import logging
import re
import socket

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.disconnect import CLIENT_CLOSED_REQUEST, ClientGone
from service.protocol import MAX_JSON_DEPTH

log = logging.getLogger("zephyr.errors")

# SQLSTATE classes that mean "the database is away, retry": 08 connection exceptions, 57P01-57P05 operator
# intervention (admin or crash shutdown, "the database system is starting up", idle timeouts).
UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "57P")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_type(status: int) -> str:
    """OpenAI's error type; a 4xx is always the client's (a new status cannot fall through to server_error)."""
    return ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or ("invalid_request" if status == 400 else None)
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": error_type(status), "param": param, "code": code}
    }


def failure_text(exc: Exception) -> str:
    """What a log row or warning says of a failure: a refusal's own message, else the exception's type and text."""
    return exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"


def error_event(exc: APIError) -> str:
    """The error as a server-sent event: a stream whose headers are sent reports a failure in-band, as OpenAI's
    does."""
    return f"data: {json.dumps(error_body(exc.status, exc.message, exc.param, exc.code))}\n\n"


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: a message that quotes the request stays encodable whatever it holds."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(exc: APIError) -> JSONResponse:
    return ErrorResponse(error_body(exc.status, exc.message, exc.param, exc.code), exc.status, headers=exc.headers)


# Union members and validator wrappers that pydantic puts in an error's location; not field names.
_TYPE_TAGS = re.compile(
    r"^(str|int|float|bool|list|dict|none|literal|constrained-\w+|function-\w+|tagged-union)(\[.*\])?$")
_NAMED_FIELD = re.compile(r"^`([\w.\[\]]+)`")


# Where FastAPI says a value came from: the request's part, not a field's name (`query.format` is `format`).
_REQUEST_PARTS = ("body", "query", "path", "header", "cookie")


def _location(loc: tuple) -> str:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'"""
    text = ""
    parts = loc[1:] if loc and loc[0] in _REQUEST_PARTS else loc
    for position, part in enumerate(parts):
        following = parts[position + 1] if position + 1 < len(parts) else None
        # A model's class name in a union's location is followed by one of its fields; a capitalised name that is
        # last (an unknown field, "Question") or followed by an index or "[key]" (a mapping's key) is the client's.
        model_name = str(part)[:1].isupper() and isinstance(following, str) and following != "[key]"
        if isinstance(part, int):
            text += f"[{part}]"
        elif _TYPE_TAGS.match(str(part)) or part == "[key]" or model_name:
            continue  # "[key]": pydantic's mark that the key before it, not its value, is wrong
        else:
            text += f".{part}" if text else str(part)
    return text


def _deepest_branch_error(errors: list[dict]) -> dict:
    """The error to name. For a field that takes one of several types (a message's content: a string, or a list of
    parts), pydantic lists an error per type, the string's first; where another type's error goes deeper (a part
    with an unknown key, a token id below 0), that one says what to fix."""
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    branch = next((i for i, part in enumerate(loc) if isinstance(part, str) and _TYPE_TAGS.match(part)), None)
    if branch is None:
        return first
    same_field = [e for e in errors if tuple(e.get("loc", ()))[:branch] == loc[:branch]]
    deepest = max(same_field, key=lambda e: len(e.get("loc", ())))  # the first of the deepest
    return deepest if len(deepest.get("loc", ())) > len(loc) else first


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    first = _deepest_branch_error(exc.errors())
    kind = first.get("type")
    if kind == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}", None
    where = _location(tuple(first.get("loc", ())))
    if kind == "missing" and not where:
        return "request body is missing; send a JSON object", None
    if kind == "extra_forbidden":
        return f"unknown field `{where}`: remove it (see the API reference in the README)", where
    if kind == "model_attributes_type" and not where:
        # FastAPI parses JSON only when the client says it is JSON: the body unparsed is bytes (a JSON string
        # sent as JSON is parsed, a str)
        if isinstance(first.get("input"), bytes):
            return ("request body was not read as JSON: send it with the header `Content-Type: application/json` "
                    "(curl -d sends a form's content type)"), None
        return "request body must be a JSON object", None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first is exc.errors()[0] and len(exc.errors()) > 1 and \
            len({_location(tuple(e.get("loc", ()))) for e in exc.errors()}) == 1:
        message = "wrong type: " + "; or ".join(dict.fromkeys(e["msg"].removeprefix("Input should be ")
                                                               for e in exc.errors()))
    if not where and (named := _NAMED_FIELD.match(message)):
        where = named.group(1)
        return message, where
    return (f"{where}: {message}" if where else message), where or None


# FastAPI's words when the body is JSON its parser cannot finish (invalid UTF-8, nesting past the parser's
# recursion limit, an integer over Python's 4,300 digits); a parse error inside the JSON is a validation error.
BODY_PARSE_ERROR = "There was an error parsing the body"
UNREADABLE_BODY = ("the body could not be read as JSON: send UTF-8 text, nest objects and lists at most "
                   f"{MAX_JSON_DEPTH} deep, and keep integers under 4,300 digits")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ClientGone)
    async def _client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc)
        return ErrorResponse(error_body(400, message, param, "invalid_request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        code = None
        if exc.status_code == 400 and message == BODY_PARSE_ERROR:
            message, code = UNREADABLE_BODY, "invalid_request"
        elif exc.status_code == 404:
            message = "no such route; see the API reference in the README"
        elif exc.status_code == 405:
            message = "method not allowed on this route"
        elif exc.status_code == 413:  # a chunked body past the limit (middleware.BodyTooLarge): as a declared one's
            code = "body_too_large"
        return ErrorResponse(error_body(exc.status_code, message, code=code), exc.status_code, headers=exc.headers)

    # The database is away (restart, failover): the review routes cannot answer, but nothing is lost and the
    # client should simply retry. Generation routes never wait on the database (their rows spill instead).
    def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable on %s: %s", request.url.path, exc)
        return ErrorResponse(error_body(503, "the review database is unavailable; retry in a few seconds",
                                       code="database_unavailable"), 503, headers={"Retry-After": "5"})

    def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return ErrorResponse(error_body(500, "internal error; the server logged it"), 500)

    # gaierror: the database's host name does not resolve (a DNS hiccup, a service being recreated).
    for unavailable in (OperationalError, InterfaceError, PoolTimeout, ConnectionError, socket.gaierror):
        @app.exception_handler(unavailable)
        async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
            return database_unavailable(request, exc)

    # asyncpg's server errors (e.g. CannotConnectNowError while PostgreSQL restarts) reach SQLAlchemy as the
    # generic DBAPIError, so the SQLSTATE decides between "retry" and a real bug.
    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated or (sqlstate(exc) or "").startswith(UNAVAILABLE_SQLSTATE_PREFIXES):
            return database_unavailable(request, exc)
        return unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected(request, exc)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, from the driver's exception (psycopg and asyncpg both name it
    `sqlstate`) wherever it sits in the chain SQLAlchemy built around it."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(code := getattr(current, "sqlstate", None), str):
            return code
        pending += [getattr(current, "orig", None), current.__cause__]
    return None
