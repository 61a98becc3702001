"""Times are UTC everywhere: one rule for a time read back without its zone."""

from __future__ import annotations

from datetime import UTC, datetime


def utc(value: datetime | None) -> datetime | None:
    """`value` in UTC; a naive time (SQLite hands them back without their zone, a hand-written manifest may have one)
    is read as UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
