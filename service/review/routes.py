"""The review page and its JSON API (reviewer or admin keys; the page signs in with a cookie), the statistics,
and the export of verdicts as training data (admin)."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import Field, StrictStr

from service.auth import (
    Principal,
    authenticate,
    client_address,
    from_another_site,
    require,
    session_cookie,
    session_token,
)
from service.errors import APIError
from service.jsonbody import UnambiguousJSONRoute
from service.protocol import INT32_MAX, Strict
from service.review import export, render, stats
from service.review.store import ReviewStore
from zephyr.clock import utc
from zephyr.settings import Settings

STATIC_DIR = Path(__file__).with_name("static")
DEFAULT_GUIDELINES = Path(__file__).with_name("guidelines.md")
TRUSTED_TYPES_POLICY = "zephyr-review"  # the name review.js gives its policy
NOT_STORED = {"Cache-Control": "no-store"}


def not_stored(response: Response) -> None:
    """Every review response carries students' conversations or a session: kept out of the browser's disk cache
    (shared school machines). Responses a route builds itself set PAGE_HEADERS or NOT_STORED instead."""
    response.headers.update(NOT_STORED)


router = APIRouter(prefix="/review", tags=["review"], route_class=UnambiguousJSONRoute,
                   dependencies=[Depends(not_stored)])
reviewer_only = require("reviewer", session=True)
# GET /api/next claims an item for the lease: an <img> on a sibling subdomain's page hid items from other reviewers.
reviewer_claiming = require("reviewer", session=True, claims=True)
admin_only = require("admin", session=True)

# Model output is untrusted: the server renders its Markdown to sanitized HTML (render.py), and this policy
# forbids inline or foreign script even if something slipped through. Trusted Types: the page's script can
# put HTML into the page only through its one named policy, which takes the server's sanitized HTML.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'; "
                               f"require-trusted-types-for 'script'; trusted-types {TRUSTED_TYPES_POLICY}",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    **NOT_STORED,
}


def review_store(request: Request) -> ReviewStore:
    return request.app.state.review_store


@router.get("", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse((STATIC_DIR / "review.html").read_text(encoding="utf-8"), headers=PAGE_HEADERS)


# The page's own script and style, by name: the HTML is served only at /review, with its policy.
ASSETS = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise APIError(404, f"no review asset {name[:64]!r}; the page is at /review", code="not_found")
    return Response((STATIC_DIR / name).read_bytes(), media_type=ASSETS[name], headers=PAGE_HEADERS)


class SignIn(Strict):
    key: StrictStr = Field(min_length=1, max_length=512)


@router.post("/session")
async def sign_in(body: SignIn, request: Request) -> JSONResponse:
    """Every attempt counts against the address's sign-in limit, and a wrong key also against its failed
    authentications, so guessing keys here is as slow as anywhere."""
    state = request.app.state
    if from_another_site(request):
        # a sibling subdomain's page could otherwise sign a reviewer's browser in under its own key (login CSRF)
        raise APIError(403, "sign in from the review page itself", code="forbidden")
    state.sign_ins.hit(client_address(request))
    if not body.key.strip():  # else read as a malformed Authorization header, and counted as a failed sign-in
        raise APIError(400, "`key` is blank: paste your reviewer key", param="key")
    principal = await authenticate(request, f"Bearer {body.key.strip()}")
    if principal.role not in ("reviewer", "admin"):
        raise APIError(403, f"the review page needs a reviewer key; this key is `{principal.role}`", code="forbidden")
    response = JSONResponse(whoami(request, principal), headers=NOT_STORED)
    name, path = session_cookie(request)
    response.set_cookie(
        name, await state.sessions.issue(principal), max_age=int(state.sessions.max_age_seconds),
        path=path, httponly=True, samesite="strict", secure=request.url.scheme == "https",
    )
    return response


@router.delete("/session")
async def sign_out(request: Request) -> Response:
    """Ends the session on the server too: a copy of the cookie stops working at once."""
    name, path = session_cookie(request)
    try:
        token = session_token(request)
    except APIError:  # two cookies: neither is revoked (which is ours?), ours is cleared all the same
        token = None
    if token:
        await request.app.state.sessions.revoke(token)
    response = Response(status_code=204)
    # as it was set: a browser ignores a __Host- cookie's deletion that does not say Secure
    response.delete_cookie(name, path=path, secure=request.url.scheme == "https", httponly=True, samesite="strict")
    return response


def whoami(request: Request, principal: Principal) -> dict:
    return {"reviewer": stats.reviewer_label(principal.key_hash, request.app.state.keyring.names),
            "role": principal.role}


@router.get("/api/me")
async def me(request: Request, principal: Principal = Depends(reviewer_only)) -> dict:
    return whoami(request, principal)


def guidelines_path(settings: Settings) -> Path:
    path = settings.review_guidelines or DEFAULT_GUIDELINES
    if not path.is_file():
        raise ValueError(f"ZEPHYR_REVIEW_GUIDELINES={path} is not a file")
    return path


@router.get("/api/guidelines")
async def guidelines(request: Request, _: Principal = Depends(reviewer_only)) -> dict:
    """The reviewers' guidelines (ZEPHYR_REVIEW_GUIDELINES, Markdown), as written and as sanitized HTML. Read at
    each request: an operator may edit the file while the server runs."""

    def read() -> dict:
        source = guidelines_path(request.app.state.settings).read_text(encoding="utf-8")
        return {"source": source, "html": render.to_html(source)}

    try:
        return await asyncio.to_thread(read)
    except (OSError, ValueError) as exc:
        raise APIError(503, f"the review guidelines cannot be read: {exc}",
                       code="guidelines_unavailable") from None


def present(item: dict | None) -> dict | None:
    """Adds to each message and answer its text rendered as sanitized HTML (`html`), beside the raw text."""
    if item is None:
        return None
    conversation = [{**message, "html": render.to_html(message.get("content") or "")}
                    for message in item["conversation"]]
    answers = [{**answer, "html": render.to_html(answer["text"])} for answer in item["answers"]]
    return {**item, "conversation": conversation, "answers": answers}


async def presented(item: dict | None) -> dict | None:
    # Rendering a long conversation is CPU work: keep it off the event loop that streams students' answers.
    return await asyncio.to_thread(present, item)


@router.get("/api/next")
async def next_item(request: Request, principal: Principal = Depends(reviewer_claiming)) -> dict:
    store = review_store(request)
    item = await store.next_item(principal.identity)
    return {"item": await presented(item), "progress": await store.progress(principal.identity)}


# review_assignments.id is an INTEGER: 32 bits on PostgreSQL, whose driver fails (a 500) on a larger bound value
AssignmentId = Field(ge=1, le=INT32_MAX, description="From GET /review/api/next")


MAX_COMMENT_CHARS = 2000  # review.html's textarea holds the same
MAX_FLAG_CHARS = max(len(name) for name in stats.FLAGS)


class VerdictRequest(Strict):
    assignment_id: int = AssignmentId
    verdict: Literal["a", "b", "tie", "both_bad", "good", "bad"]
    strength: int | None = Field(default=None, ge=1, le=4)
    # Bounded by the longest flag name and the flags there are; a name not among them is refused by the store.
    flags: dict[Literal["A", "B"], Annotated[list[Annotated[StrictStr, Field(max_length=MAX_FLAG_CHARS)]],
                                             Field(max_length=len(stats.FLAGS))]] = Field(
        default={}, description="Flag names per answer")
    # Bounded as typed, before redaction (whose placeholders may lengthen it) spends any CPU on it.
    comment: StrictStr | None = Field(default=None, max_length=MAX_COMMENT_CHARS)


@router.post("/api/verdicts", status_code=201)
async def give_verdict(body: VerdictRequest, request: Request, principal: Principal = Depends(reviewer_only)) -> dict:
    store = review_store(request)
    comment, redactor = body.comment, request.app.state.redactor
    if comment and redactor is not None:  # reviewers quote students; CPU work, kept off the event loop
        comment = await asyncio.to_thread(redactor.redact, comment)
    await store.judge(principal.identity, body.assignment_id, body.verdict, body.strength, body.flags, comment)
    request.app.state.metrics.review_verdicts.labels(body.verdict).inc()
    return {"progress": await store.progress(principal.identity)}


class SkipRequest(Strict):
    assignment_id: int = AssignmentId


@router.post("/api/skip")
async def skip(body: SkipRequest, request: Request, principal: Principal = Depends(reviewer_only)) -> dict:
    store = review_store(request)
    await store.skip(principal.identity, body.assignment_id)
    return {"progress": await store.progress(principal.identity)}


@router.post("/api/undo")
async def undo(request: Request, principal: Principal = Depends(reviewer_only)) -> dict:
    store = review_store(request)
    item = await store.undo(principal.identity)
    return {"item": await presented(item), "progress": await store.progress(principal.identity)}


@router.get("/stats")
async def statistics(request: Request, principal: Principal = Depends(reviewer_only)) -> dict:
    """The team's review statistics; only an admin sees the other reviewers' names."""
    result = await review_store(request).statistics()
    if principal.role == "admin":
        return result
    keyring = request.app.state.keyring
    return stats.for_reviewer(result, whoami(request, principal)["reviewer"], secret_order=keyring.digest)


@router.get("/export")
async def export_verdicts(
    request: Request,
    format: export.Format = Query(..., description="dpo, kto or sft"),
    min_agreement: float = Query(0.0, ge=0, le=1, allow_inf_nan=False),
    min_reviewers: int | None = Query(None, ge=1, le=1000, description="least verdicts per item (default: "
                                      "ZEPHYR_REVIEW_OVERLAP, items every reviewer they wait for has judged)"),
    include_flagged: bool = Query(False, description="dpo: keep pairs whose chosen answer a reviewer flagged "
                                  "incorrect or unsafe"),
    since: datetime | None = Query(None, description="items created on or after this date (ISO 8601, UTC unless "
                                   "it says)"),
    judged_since: datetime | None = Query(None, description="items with a verdict given on or after this time, "
                                          "with all their verdicts (ISO 8601, UTC unless it says): an export after "
                                          "the last one"),
    model: str | None = Query(None, max_length=256, description="only records whose every answer this registry "
                              "model wrote"),
    include_unfinished: bool = Query(False, description="keep answers cut off at max_tokens and those the guard "
                                     "refused or stopped (to count verdicts, not as training text)"),
    _: Principal = Depends(admin_only),
) -> Response:
    bounds = {}
    for name, value in (("since", since), ("judged_since", judged_since)):
        try:
            bounds[name] = utc(value)
        except OverflowError:  # within a day of year 1 or 9999, its UTC time is no datetime
            raise APIError(400, f"`{name}` {value.isoformat()} is out of range in UTC; send a date between the years "
                                "1 and 9999", param=name) from None
    store = review_store(request)
    judgements, generations = await store.judgements(bounds["since"], judged_since=bounds["judged_since"])
    min_reviewers = min_reviewers or request.app.state.settings.review_overlap
    options = export.ExportOptions(format, min_agreement, min_reviewers, include_flagged, model, include_unfinished)
    left_out: Counter[str] = Counter()
    # Redaction is CPU work: keep it off the event loop that streams students' answers.
    text, count = await asyncio.to_thread(export.to_jsonl, judgements, generations, options,
                                          request.app.state.redactor, left_out)
    return Response(text, media_type="application/x-ndjson", headers={
        **NOT_STORED, "Content-Disposition": f'attachment; filename="review-{format}.jsonl"',
        "X-Record-Count": str(count),
        "X-Left-Out-Unfinished": str(left_out["unfinished"]), "X-Left-Out-Other-Model": str(left_out["other_model"]),
        "X-Left-Out-Too-Few-Reviewers": str(left_out["too_few_reviewers"]),
        "X-Left-Out-Identical": str(left_out["identical"])})
