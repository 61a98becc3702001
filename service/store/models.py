"""The generation log's schema. Alembic migrations in ``migrations/`` create and evolve it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Generation(Base):
    """One served request: what the student sent (PII-redacted), what the tutor answered, and how."""

    __tablename__ = "generations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the request id
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    route: Mapped[str] = mapped_column(String(32), index=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    api_key_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    role: Mapped[str | None] = mapped_column(String(16))
    user: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16))  # ok, aborted, error
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    response: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # one entry a choice
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    review_requested: Mapped[bool] = mapped_column(Boolean, default=False)  # the client marked it
    # "served" answered a client; "candidate" is a second answer made for review, off the request path.
    purpose: Mapped[str] = mapped_column(String(16), default="served", server_default="served")
    parent_id: Mapped[str | None] = mapped_column(String(64), index=True)  # a candidate's served generation
    review_kind: Mapped[str | None] = mapped_column(String(8), index=True)  # None, "single" or "pair"


class ReviewAssignment(Base):
    """One reviewer's view of one review item, and their verdict once given. The unique constraint is what
    makes "a reviewer never sees an item twice" hold even with two tabs open."""

    __tablename__ = "review_assignments"
    __table_args__ = (UniqueConstraint("item_id", "reviewer", name="uq_review_assignments_item_reviewer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(String(64), ForeignKey("generations.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(64), index=True)  # the reviewer key's keyed digest (HMAC)
    status: Mapped[str] = mapped_column(String(8), index=True)  # shown, judged, skipped
    shown_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    left_id: Mapped[str] = mapped_column(String(64))  # generation shown as answer A
    right_id: Mapped[str | None] = mapped_column(String(64))  # answer B; None for a single answer
    verdict: Mapped[str | None] = mapped_column(String(8))  # a, b, tie, both_bad (pairs); good, bad (singles)
    chosen_id: Mapped[str | None] = mapped_column(String(64))  # the preferred generation for a / b
    strength: Mapped[int | None] = mapped_column(Integer)  # 1-4, for a / b
    flags: Mapped[list[str]] = mapped_column(JSON, default=list)
    comment: Mapped[str | None] = mapped_column(Text)
    judged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)


class ReviewSession(Base):
    """A review sign-in. The cookie carries the session id; the row holds only its keyed digest, so the
    database cannot be turned into a cookie, and deleting the row (sign-out) ends the session everywhere."""

    __tablename__ = "review_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # HMAC of the session id
    reviewer: Mapped[str] = mapped_column(String(64), index=True)  # the key's keyed digest
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
