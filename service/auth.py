"""Bearer API keys with roles, review sign-in sessions, and the limits on what a key (or an address) may ask.

Nothing at rest can be turned into a credential: rows hold a keyed digest (HMAC) of each key, the review
cookie is signed with a secret kept outside the database, and sessions live in the database only as
keyed digests of their ids, so signing out (or removing a key) ends them on every replica."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from fastapi import Request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from service.errors import APIError
from service.middleware import host_name, origin_host
from zephyr.paths import private_dir, private_file

OPEN_IDENTITY = "open"  # who every request is when the server runs open (no keys, loopback only)
SESSION_COOKIE = "zephyr_review"
# Over HTTPS the cookie is `__Host-` prefixed: a browser takes such a cookie only from this very host (no Domain, Path
# /, Secure), so a page on a sibling subdomain cannot plant its own sign-in beside or instead of a reviewer's.
SECURE_SESSION_COOKIE = "__Host-zephyr_review"
SECRET_FILE = "secret"


def session_cookie(request: Request) -> tuple[str, str]:
    """The review sign-in cookie's name and path for this request's scheme (as the proxy in front says it was)."""
    return (SECURE_SESSION_COOKIE, "/") if request.url.scheme == "https" else (SESSION_COOKIE, "/review")


def session_token(request: Request) -> str | None:
    """The sign-in cookie's token. Two of them (one a sibling subdomain set for the parent domain, which the browser
    sends beside the reviewer's own, and which the cookie parser would take in its place) are refused: verdicts
    would be given under another reviewer's name."""
    name, path = session_cookie(request)
    sent = [part.split("=", 1)[0].strip() for part in request.headers.get("cookie", "").split(";")]
    if sent.count(name) > 1:
        secure = "; Secure" if name == SECURE_SESSION_COOKIE else ""  # a browser ignores a __Host- one without
        raise APIError(401, "two review sign-in cookies arrived, one of them set by another site under this domain; "
                            "clear this site's cookies in the browser and sign in again", code="invalid_session",
                       headers={"Set-Cookie": f"{name}=; Max-Age=0; Path={path}; HttpOnly; SameSite=strict{secure}"})
    return request.cookies.get(name)


def install_secret(home: Path, configured: str | None) -> bytes:
    """ZEPHYR_SESSION_SECRET, or a random secret made once per install and kept 0600 in `$ZEPHYR_HOME/secret`.
    Replicas that share a database must share the secret (the Helm chart sets it)."""
    if configured:
        return configured.encode()
    path = private_dir(home) / SECRET_FILE
    if not path.exists():
        _publish_secret(path)
    private_file(path)  # one an earlier version or a copy left readable
    for _ in range(50):  # a replica beside us on a volume without hard links may still be writing it
        value = path.read_text().strip()
        if len(value) >= 32:
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"{path} holds no usable secret; delete it (sign-ins and key digests change)")
    return value.encode()


def _publish_secret(path: Path) -> None:
    """A new random secret at `path` unless one is there. Written whole under another name, then linked into place,
    which fails where the name exists: replicas sharing a volume agree on the first one published, and none reads
    one half written."""
    def write_new(target: Path) -> None:  # FileExistsError where `target` is already there
        with os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(value)
            out.flush()
            os.fsync(out.fileno())

    draft = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    value = secrets.token_hex(32)
    try:
        write_new(draft)
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        except OSError:  # a volume without hard links: created exclusively in place (readers wait for it whole)
            with contextlib.suppress(FileExistsError):
                write_new(path)
    finally:
        draft.unlink(missing_ok=True)


def _derive(secret: bytes, purpose: str) -> bytes:
    """One secret, separate keys per use: a digest of a key never signs a cookie."""
    return hmac.new(secret, f"zephyr:{purpose}".encode(), hashlib.sha256).digest()


def legacy_digest(key: str) -> str:
    """The plain SHA-256 digest earlier versions stored; only to find and re-key their rows."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    role: str
    key_hash: str | None  # None when the server runs open (no keys configured, loopback only)

    @property
    def identity(self) -> str:
        """Whom the limits count and the review queue knows: the key's digest, or OPEN_IDENTITY."""
        return self.key_hash or OPEN_IDENTITY


def reviewer_names(named: dict[str, str]) -> dict[str, str]:
    """Key digest -> the name reviewers are shown by (ZEPHYR_API_KEYS' `name=role:key`). Statistics count each key
    as one reviewer, so a name that two keys share gets each key's digest prefix added: labels stay distinct."""
    holders: dict[str, int] = {}
    for name in named.values():
        holders[name] = holders.get(name, 0) + 1
    return {digest: name if holders[name] == 1 else f"{name} ({digest[:8]})" for digest, name in named.items()}


class KeyRing:
    """Keys are kept only as keyed digests; a lookup digests the presented key first, so comparison time
    reveals nothing about a stored key."""

    def __init__(self, entries: Iterable[tuple[str, str, str | None]], secret: bytes):
        self._digest_key = _derive(secret, "api-key-digest")
        entries = list(entries)
        self._roles = {self.digest(key): role for role, key, _ in entries}
        self.legacy = {legacy_digest(key): self.digest(key) for _, key, _ in entries}
        self.names = reviewer_names({self.digest(key): name for _, key, name in entries if name})

    def digest(self, key: str) -> str:
        return hmac.new(self._digest_key, key.encode(), hashlib.sha256).hexdigest()

    @property
    def known_digests(self) -> set[str]:
        """Every digest a configured key may be stored under: keyed, and the plain one of earlier versions."""
        return set(self._roles) | set(self.legacy)

    def retired(self, stored_digest: str) -> str:
        """What a digest of a key no longer configured becomes: keyed, so that no plain digest stays at rest."""
        return hmac.new(self._digest_key, b"retired:" + stored_digest.encode(), hashlib.sha256).hexdigest()

    @property
    def open(self) -> bool:
        return not self._roles

    def authenticate(self, authorization: str | None) -> Principal:
        if self.open:
            return Principal(role="admin", key_hash=None)
        if not authorization:
            raise APIError(401, "missing API key: send the header `Authorization: Bearer <key>`",
                           code="missing_api_key")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "malformed Authorization header: use `Bearer <key>`", code="invalid_api_key")
        principal = self.from_digest(self.digest(token.strip()))
        if principal is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return principal

    def from_digest(self, digest: str) -> Principal | None:
        role = self._roles.get(digest)
        return None if role is None else Principal(role=role, key_hash=digest)


class SessionStore(Protocol):
    """Where sessions live (the review database): rows keyed by a digest of the session id."""

    async def create_session(self, session_digest: str, reviewer: str, expires_at: datetime) -> None: ...

    async def session_reviewer(self, session_digest: str, now: datetime) -> str | None: ...

    async def delete_session(self, session_digest: str) -> None: ...


INVALID_SESSION = "your review sign-in has expired, was signed out or is invalid; sign in again with your key"


class Sessions:
    """Review sign-in cookies: a signed random session id whose server-side row (kept as a keyed digest)
    names the reviewer. Each request checks the row and the key ring, so signing out, expiry and removing
    a key all end the session, on every replica."""

    def __init__(self, secret: bytes, max_age_seconds: float):
        self._serializer = URLSafeTimedSerializer(_derive(secret, "review-session"), salt="zephyr-review")
        self._id_key = _derive(secret, "review-session-id")
        self.max_age_seconds = max_age_seconds
        self.store: SessionStore | None = None  # set in the app's lifespan, once the database is open

    def _digest(self, session_id: str) -> str:
        return hmac.new(self._id_key, session_id.encode(), hashlib.sha256).hexdigest()

    def _session_id(self, token: str) -> str:
        try:
            session_id = self._serializer.loads(token, max_age=self.max_age_seconds)["sid"]
        except (BadSignature, KeyError, TypeError) as exc:
            raise APIError(401, INVALID_SESSION, code="invalid_session") from exc
        if not isinstance(session_id, str):
            raise APIError(401, INVALID_SESSION, code="invalid_session")
        return session_id

    async def issue(self, principal: Principal) -> str:
        session_id = secrets.token_urlsafe(32)
        expires_at = datetime.now(UTC) + timedelta(seconds=self.max_age_seconds)
        await self.store.create_session(self._digest(session_id), principal.identity, expires_at)
        return self._serializer.dumps({"sid": session_id})

    async def verify(self, token: str, keyring: KeyRing) -> Principal:
        reviewer = await self.store.session_reviewer(self._digest(self._session_id(token)), datetime.now(UTC))
        if reviewer is None:
            raise APIError(401, INVALID_SESSION, code="invalid_session")
        if keyring.open:
            return Principal(role="admin", key_hash=None)
        principal = keyring.from_digest(reviewer)
        if principal is None:
            raise APIError(401, "the key you signed in with is no longer valid; sign in again", code="invalid_session")
        return principal

    async def revoke(self, token: str) -> None:
        try:
            session_id = self._session_id(token)
        except APIError:
            return  # an invalid cookie is no session: nothing to end
        await self.store.delete_session(self._digest(session_id))


class Limiter:
    """A moving-window limit in `limits` notation ("600/minute") over any identity; an empty string turns it
    off (e.g. when a gateway in front already limits). `cost` weighs a request by the work it asks for."""

    def __init__(self, limit: str, what: str, code: str = "rate_limit_exceeded"):
        self.item: RateLimitItem | None = parse(limit) if limit.strip() else None
        self.what = what
        self.code = code
        self._limiter = MovingWindowRateLimiter(MemoryStorage()) if self.item else None

    def _refuse(self, identity: str, detail: str, needs: int) -> APIError:
        """`needs`: the units the retried request will spend. The window's reset is when its oldest unit expires:
        room for one. Room for more may take until newer ones expire too, which the window does not tell: a whole
        window is always enough."""
        reset_at, _ = self._limiter.get_window_stats(self.item, identity)
        retry_after = max(1, math.ceil(reset_at - time.time())) if needs <= 1 else self.item.get_expiry()
        return APIError(429, f"{detail}; retry after {retry_after} s", code=self.code,
                        headers={"Retry-After": str(retry_after)})

    def fits(self, cost: int) -> None:
        """A request bigger than the whole window would wait forever: a 400, not a 429 to retry."""
        if self.item is not None and cost > self.item.amount:
            raise APIError(400, f"this request is {cost} units of work, more than the whole limit of {self.item} "
                                f"{self.what}; split it into smaller requests", code="request_too_large")

    def hit(self, identity: str, cost: int = 1, needs: int | None = None) -> None:
        """Counts `cost` units, or refuses with a 429. Call `fits(cost)` first for a cost over 1 (`admitted` does):
        given a cost over the whole window this refuses every time. `needs`: what the whole request spends, if more
        (the rest of a request whose first unit was counted at authentication), for its Retry-After."""
        if self._limiter is None or cost <= 0:
            return
        if not self._limiter.hit(self.item, identity, cost=cost):
            raise self._refuse(identity, f"limit of {self.item} {self.what} exceeded", needs or cost)

    def check(self, identity: str, cost: int = 1, needs: int | None = None) -> None:
        """Refuses when the window has no room for `cost` more units, without counting them (`needs`: as hit's)."""
        if self._limiter is not None and cost > 0 and not self._limiter.test(self.item, identity, cost=cost):
            raise self._refuse(identity, f"limit of {self.item} {self.what} exceeded", needs or cost)


class RateLimiter(Limiter):
    """Per key, weighted by work: a chat costs its `n`, a batch its questions (see `admitted`)."""

    def __init__(self, limit: str):
        super().__init__(limit, "units of work per API key")


def client_address(request: Request) -> str:
    """Whom per-address limits count: the peer's address (behind a proxy, uvicorn's --forwarded-allow-ips makes it
    the real client), or for IPv6 its /64, since one subscriber is given a whole /64 and could try keys from a
    fresh address each time."""
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 client it names
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@contextmanager
def _counted_refusal(state: Any, reason: str = "rate_limit") -> Iterator[None]:
    """A budget's refusal raised inside is counted in the metrics, wherever the budget was asked."""
    try:
        yield
    except APIError:
        state.metrics.rejected.labels(reason).inc()
        raise


def _count_work(state: Any, principal: Principal, units: int, needs: int | None = None) -> None:
    with _counted_refusal(state):
        state.rate_limiter.hit(principal.identity, units, needs)


@contextmanager
def admissible(request: Request, cost: int = 1, *, weight: int = 1, for_review: bool = False) -> Iterator[None]:
    """The refusals of `admitted` (its size, admission, then the rate limit), without taking a place or spending a
    budget: held around the work a request costs ahead of its admission (tokenizing, the guard's screening on the
    encoder's one thread), so a replica does not spend that on requests it will refuse: while shedding load, or for a
    key whose window has no room for the rest of the request's work. Requests inside count against admission with
    those admitted, so a burst does not all queue at the guard to be refused afterwards. `for_review`: the request
    marks its answer for review, so the review budget must have room too."""
    state, identity = request.app.state, request.state.principal.identity
    state.rate_limiter.fits(cost)
    with state.tutor.admission.preparing(weight):
        if for_review:
            with _counted_refusal(state, "review_budget"):
                state.review_requests.check(identity)
        with _counted_refusal(state):
            state.rate_limiter.check(identity, cost - 1, needs=cost)  # `require` counted the first unit
        yield


@contextmanager
def admitted(request: Request, cost: int = 1, *, weight: int = 1,
             for_review: bool = False) -> Iterator[Any]:
    """The one way a request that asks the engine for work gets in (behind `require`, which counted its first
    unit), in this order:
    1. its size: a request no window could hold is a 400, never a 503 or 429 to retry;
    2. admission (`weight` places, or a 503): a request refused here costs nothing beyond that first unit;
    3. the budgets, spent only when all of them allow it: the review budget when the request goes to review
       (`for_review`), then the work beyond the first unit.
    Yields the admission slot (`service.tutor.AdmissionSlot`, not imported: the tutor imports this module), which a
    stream may hand off."""
    state, identity = request.app.state, request.state.principal.identity
    state.rate_limiter.fits(cost)
    with state.tutor.admission.admit(weight) as slot:
        if for_review:
            with _counted_refusal(state, "review_budget"):
                state.review_requests.check(identity)
        _count_work(state, request.state.principal, cost - 1, needs=cost)  # `require` counted the first unit
        if for_review:
            state.review_requests.hit(identity)
        yield slot


async def authenticate(request: Request, authorization: str | None, session_token: str | None = None) -> Principal:
    """The key (or the review sign-in cookie) behind a request. An address that keeps failing is refused (429)
    before its next key is even checked; every wrong credential counts against it. A request that presents none
    (a probe, the review page before sign-in, a client not yet configured) guesses nothing: it is refused but not
    counted, or students behind one school's address would lock each other out."""
    state = request.app.state
    address = client_address(request)
    try:
        if session_token or authorization:
            state.auth_failures.check(address)
        if session_token:
            return await state.sessions.verify(session_token, state.keyring)
        return state.keyring.authenticate(authorization)
    except APIError as exc:
        if exc.status == 401:
            state.metrics.rejected.labels("authentication").inc()
            if exc.code != "missing_api_key":
                state.auth_failures.hit(address)
        elif exc.status == 429:
            state.metrics.rejected.labels("auth_throttle").inc()
        raise


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CHECKED_PRINCIPALS = "zephyr.principals"  # the request scope's key: each `require` dependency's principal
SAME_ORIGIN = frozenset({"same-origin", "none"})  # "none": typed by the user, not sent by a page


def from_another_site(request: Request) -> bool:
    """Whether the browser says a request came from a page of another site or of a sibling subdomain (which
    SameSite=Strict lets carry the sign-in cookie): Sec-Fetch-Site says so; a browser that sends none (Safari before
    16.4) still sends Origin with a POST, which must then be this server's own host (as the client asked for it, or
    as the proxy in front says it was asked for). A request with neither is no browser page's."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in SAME_ORIGIN
    origin = request.headers.get("origin")
    if origin is None:
        return False
    # By host name alone (as the open server's loopback check reads them): a proxy's `Host $host` drops the port the
    # Origin keeps, and a forwarded list names the browser's host first.
    forwarded = (request.headers.get("x-forwarded-host") or "").split(",")[0]
    own = {host_name(value.strip().lower()) for value in (request.headers.get("host") or "", forwarded)} - {""}
    asked_from = origin_host(origin.strip().lower())
    return asked_from == "null" or asked_from not in own  # "null": a sandboxed page, which has no host


def require(*roles: str, session: bool = False, claims: bool = False) -> Callable[[Request], Awaitable[Principal]]:
    """Dependency: authenticate, apply the key's rate limit, and check its role (admin may do anything).
    With `session`, the review page's sign-in cookie is accepted when no Authorization header is sent. `claims`: a
    GET that changes state (the review queue's next item is claimed), held to the page's own origin as a POST is."""

    async def dependency(request: Request) -> Principal:
        # Run by the route before it read the body, then by FastAPI: checked and counted once. Kept per dependency,
        # so a route under two (a router's and its own) is held to both.
        checked = request.scope.setdefault(CHECKED_PRINCIPALS, {})
        if dependency in checked:
            return checked[dependency]
        authorization = request.headers.get("authorization")
        token = session_token(request) if session and not authorization else None
        if token and (claims or request.method not in SAFE_METHODS) and from_another_site(request):
            # SameSite=Strict keeps other sites' requests from carrying the cookie, not a sibling subdomain's; the
            # browser says where a request came from (Sec-Fetch-Site), and only the page itself may change state.
            raise APIError(403, "a signed-in change must come from the review page itself", code="forbidden")
        principal = await authenticate(request, authorization, token)
        if principal.role != "admin" and principal.role not in roles:
            raise APIError(403, f"this route needs the role {' or '.join(roles)}; your key is `{principal.role}`",
                           code="forbidden")
        _count_work(request.app.state, principal, 1)
        request.state.principal = principal
        checked[dependency] = principal
        return principal

    dependency.checks_credentials = True  # type: ignore[attr-defined]  # what UnambiguousJSONRoute runs first
    return dependency
