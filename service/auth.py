"""Bearer API keys with roles, and per-key rate limits (the `limits` library, moving window)."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fastapi import Request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from service.errors import APIError

OPEN_MODE_KEY = "open-mode"
SESSION_COOKIE = "zephyr_review"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    role: str
    key_hash: str | None  # None when the server runs open (no keys configured, loopback only)


class KeyRing:
    """Keys are kept only as SHA-256 digests; a lookup hashes the presented key first, so comparison
    time reveals nothing about a stored key."""

    def __init__(self, entries: Iterable[tuple[str, str]]):
        self._roles = {hash_key(key): role for role, key in entries}

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
        principal = self.from_digest(hash_key(token.strip()))
        if principal is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return principal

    def from_digest(self, digest: str) -> Principal | None:
        role = self._roles.get(digest)
        return None if role is None else Principal(role=role, key_hash=digest)

    def session_secret(self) -> str:
        """Default secret for sign-in cookies: the same on every replica with the same keys, and changed
        (signing everyone out) when the keys change. ZEPHYR_SESSION_SECRET overrides it."""
        return hashlib.sha256("\0".join(["zephyr-review-session", *sorted(self._roles)]).encode()).hexdigest()


class Sessions:
    """Signed, expiring sign-in cookies for the review page. The cookie holds the key's digest, never the key,
    and is checked against the key ring on every request, so removing a key signs its holder out."""

    def __init__(self, secret: str, max_age_seconds: float):
        self._serializer = URLSafeTimedSerializer(secret, salt="zephyr-review")
        self.max_age_seconds = max_age_seconds

    def issue(self, principal: Principal) -> str:
        return self._serializer.dumps({"key": principal.key_hash})

    def verify(self, token: str, keyring: KeyRing) -> Principal:
        try:
            digest = self._serializer.loads(token, max_age=self.max_age_seconds)["key"]
        except (BadSignature, KeyError, TypeError) as exc:
            raise APIError(401, "your review sign-in has expired or is invalid; sign in again with your key",
                           code="invalid_session") from exc
        if keyring.open:
            return Principal(role="admin", key_hash=None)
        principal = keyring.from_digest(digest) if isinstance(digest, str) else None
        if principal is None:
            raise APIError(401, "the key you signed in with is no longer valid; sign in again", code="invalid_session")
        return principal


class RateLimiter:
    """Per-key limit in `limits` notation ("600/minute"); an empty string turns it off (e.g. when a gateway
    in front already limits)."""

    def __init__(self, limit: str):
        self.item = parse(limit) if limit.strip() else None
        self._limiter = MovingWindowRateLimiter(MemoryStorage()) if self.item else None

    def check(self, principal: Principal) -> None:
        if self._limiter is None:
            return
        key = principal.key_hash or OPEN_MODE_KEY
        if not self._limiter.hit(self.item, key):
            reset_at, _ = self._limiter.get_window_stats(self.item, key)
            retry_after = max(1, math.ceil(reset_at - time.time()))
            raise APIError(
                429,
                f"rate limit of {self.item} per API key exceeded; retry after {retry_after} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry_after)},
            )


def require(*roles: str, session: bool = False) -> Callable[[Request], Principal]:
    """Dependency: authenticate, apply the key's rate limit, and check its role (admin may do anything).
    With `session`, the review page's sign-in cookie is accepted when no Authorization header is sent."""

    def dependency(request: Request) -> Principal:
        state = request.app.state
        authorization = request.headers.get("authorization")
        token = request.cookies.get(SESSION_COOKIE) if session and not authorization else None
        if token:
            principal = state.sessions.verify(token, state.keyring)
        else:
            principal = state.keyring.authenticate(authorization)
        if principal.role != "admin" and principal.role not in roles:
            raise APIError(403, f"this route needs the role {' or '.join(roles)}; your key is `{principal.role}`",
                           code="forbidden")
        try:
            state.rate_limiter.check(principal)
        except APIError:
            state.metrics.rejected.labels("rate_limit").inc()
            raise
        request.state.principal = principal
        return principal

    return dependency
