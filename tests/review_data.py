"""Review items written straight into a generation-log database, for tests of the review store, statistics
and export (the served path that makes them is tested through HTTP separately)."""

from __future__ import annotations

import os
import uuid
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from service.metrics import Metrics
from service.store.log import GenerationLog
from service.store.models import GenerationRecord

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def generation(gid: str, messages: list[dict], answer: str, *, created_at: datetime, model: str = "tutor",
               purpose: str = "served", parent_id: str | None = None, review_kind: str | None = None,
               status: str = "ok", variant: str | None = None) -> dict:
    return {
        "id": gid, "created_at": created_at, "route": "chat" if purpose == "served" else "review_candidate",
        "model": model, "api_key_hash": None, "role": "student", "user": None, "status": status,
        "messages": messages, "response": [{"index": 0, "content": answer, "finish_reason": "stop"}],
        "params": {"variant": variant} if variant else {}, "prompt_tokens": 5, "completion_tokens": 5,
        "ttft_ms": 1.0, "latency_ms": 2.0, "error": None, "review_requested": False, "purpose": purpose,
        "parent_id": parent_id, "review_kind": review_kind,
    }


def pair(item_id: str, question: str, served: str, candidate: str | None, *, minute: int = 0,
         candidate_status: str = "ok") -> list[dict]:
    """A served answer picked for review and (unless None) its resampled candidate."""
    messages = [{"role": "system", "content": "You are a tutor."}, {"role": "user", "content": question}]
    at = T0 + timedelta(minutes=minute)
    rows = [generation(item_id, messages, served, created_at=at, review_kind="pair" if candidate is not None
                       or candidate_status != "ok" else "single")]
    if candidate is not None:
        rows.append(generation(f"{item_id}-cand", messages, candidate, created_at=at + timedelta(seconds=5),
                               purpose="candidate", parent_id=item_id, status=candidate_status, variant="T=1"))
    return rows


async def open_log(url: str, spill_dir: Path) -> GenerationLog:
    log = GenerationLog(url, spill_dir / "spill.jsonl", Metrics(), None, flush_seconds=0.01)
    await log.start()
    return log


async def seed(log: GenerationLog, rows: list[dict]) -> None:
    """Rows go in as given (no redaction: the log's redactor is off), as the server would have stored them."""
    await log._insert([GenerationRecord.from_dict(row) for row in rows])


def postgres_url() -> str:
    """The test PostgreSQL server's URL. Missing, the PostgreSQL cases skip on a developer's machine and fail in
    CI: skipped there, they turned every store test of PostgreSQL into an `s` under a green run."""
    url = os.environ.get("ZEPHYR_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("ZEPHYR_TEST_POSTGRES_URL is unset: .ci/run starts PostgreSQL (scripts/postgres-for-tests.sh)")
        pytest.skip("set ZEPHYR_TEST_POSTGRES_URL (bash scripts/postgres-for-tests.sh prints it)")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
async def fresh_db_url(request, tmp_path):
    """An empty database per test: a SQLite file, or a new database on the test PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'review.db'}"
        return
    base = postgres_url()
    name = f"review_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(base, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f"CREATE DATABASE {name}"))
    yield base.rsplit("/", 1)[0] + f"/{name}"
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    except Exception as exc:  # a leftover database on the throwaway test server harms nothing
        warnings.warn(f"could not drop test database {name}: {exc}", stacklevel=1)
    finally:
        await admin.dispose()
