"""The generation log's schema. Alembic migrations in ``migrations/`` create and evolve it.

`GenerationRecord` is one row of the `generations` table as the service produces it (service/generation.py)
and the log queues, redacts, spills and inserts it (service/store/log.py); `Generation` is the ORM class the
database reads and writes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

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
    # Which weights of its model's name wrote this (zephyr.registry.ModelManifest.revision): reviews name models by
    # name, and a model remade under its name is other weights (`eval gate --reviews` counts a pair for those).
    model_revision: Mapped[str | None] = mapped_column(String(80))


# When the spill's replay set a line aside (one that is no row) into the rejected file: what the retention dates
# it by. An underscore key, which from_dict ignores, so a set-aside row can still be replayed as it was.
SET_ASIDE_KEY = "_set_aside_at"


@dataclass(slots=True)
class GenerationRecord:
    """One `generations` row, typed: the fields are the table's columns, in its order (a unit test holds them
    together). `redacted` is no column: it says the PII redactor has already run over the row.

    Its JSON form is the spill file's line format, unchanged from when rows were plain dicts: the columns by
    name, `created_at` in ISO 8601, and `"_redacted": true` once redacted. `from_dict` reads that form, so
    spill files written by earlier versions (which may also lack the review columns) still replay."""

    id: str  # the request id
    created_at: datetime
    route: str  # chat, mcq, review_candidate
    model: str
    api_key_hash: str | None
    role: str | None
    user: str | None
    status: str  # ok, aborted, error
    messages: list[dict[str, Any]]  # {"role", "content"} each
    # One entry a choice: chat {"index", "content", "finish_reason"}; MCQ also "answer", "probabilities",
    # "confidence", "abstained", "scores".
    response: list[dict[str, Any]]
    params: dict[str, Any]  # the generation parameters that shaped the answer (plus route-specific ones)
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    latency_ms: float
    error: str | None
    review_requested: bool = False
    purpose: str = "served"  # or "candidate"
    parent_id: str | None = None
    review_kind: str | None = None  # None, "single" or "pair"
    model_revision: str | None = None  # the writing registry entry's revision (None: not known)
    redacted: bool = False

    REDACTED_KEY: ClassVar[str] = "_redacted"

    def columns(self) -> dict[str, Any]:
        """The row as the insert statement takes it: one value a column."""
        return {name: getattr(self, name) for name in COLUMN_NAMES}

    def to_json(self) -> dict[str, Any]:
        """The spill file's form of the row (JSON-ready: `created_at` as ISO 8601)."""
        row = self.columns()
        row["created_at"] = self.created_at.isoformat()
        if row["model_revision"] is None:  # a column added later, written when known: the line reads as it did
            del row["model_revision"]
        if self.redacted:
            row[self.REDACTED_KEY] = True
        return row

    def to_json_line(self) -> str:
        return json.dumps(self.to_json(), default=json_default) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRecord:
        """A row from its dict form (a spill-file line, or a test's row). Keys that start with `_` other than
        `_redacted` are ignored, as the dict-based log did; a key that is no column, or a column missing
        without a default, is a ValueError (the replay sets such a row aside in the rejected file)."""
        if not isinstance(data, dict):
            raise ValueError(f"a generation row is a JSON object, not {type(data).__name__}")
        values = {k: v for k, v in data.items() if not k.startswith("_")}
        unknown = values.keys() - COLUMN_NAMES
        if unknown:
            raise ValueError(f"not columns of the generations table: {', '.join(sorted(unknown))}")
        if isinstance(values.get("created_at"), str):
            values["created_at"] = datetime.fromisoformat(values["created_at"])
        if "created_at" in values and not isinstance(values["created_at"], datetime):
            # a null or a number: refused by the database, and then not even writable to the rejected file
            raise ValueError(f"created_at is {values['created_at']!r}, not a time")
        try:
            return cls(**values, redacted=bool(data.get(cls.REDACTED_KEY, False)))
        except TypeError as exc:  # a required column missing
            raise ValueError(str(exc)) from exc


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__} in the generation log")


COLUMN_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(GenerationRecord) if f.name != "redacted")


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
    judged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)  # or skipped (since
    # 2026-12-07: skips before carry none, and undo reaches them after every timed one)


class ReviewSession(Base):
    """A review sign-in. The cookie carries the session id; the row holds only its keyed digest, so the
    database cannot be turned into a cookie, and deleting the row (sign-out) ends the session everywhere."""

    __tablename__ = "review_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # HMAC of the session id
    reviewer: Mapped[str] = mapped_column(String(64), index=True)  # the key's keyed digest
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class StoreState(Base):
    """One-time facts about the database itself: which start-up clean-ups have run (migration 0004)."""

    __tablename__ = "store_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    set_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
