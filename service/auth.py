"""Bearer API keys with roles, and per-key rate limits (the `limits` library, moving window)."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fastapi import Request
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from service.errors import APIError

OPEN_MODE_KEY = "open-mode"


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
        digest = hash_key(token.strip())
        role = self._roles.get(digest)
        if role is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return Principal(role=role, key_hash=digest)


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


def require(*roles: str) -> Callable[[Request], Principal]:
    """Dependency: authenticate, apply the key's rate limit, and check its role (admin may do anything)."""

    def dependency(request: Request) -> Principal:
        state = request.app.state
        principal = state.keyring.authenticate(request.headers.get("authorization"))
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
