"""The generation log on both supported databases: SQLite (default) and a real PostgreSQL
(`scripts/postgres-for-tests.sh` starts one on loopback; `.ci/run` does so and sets ZEPHYR_TEST_POSTGRES_URL)."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import text

from service.metrics import Metrics
from service.store.log import GenerationLog
from service.store.models import GenerationRecord
from tests.review_data import postgres_url
from tests.unit.test_generation_log import row
from zephyr.pii import Redactor

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'log.db'}"
    return postgres_url()


async def test_rows_are_written_redacted_and_replays_are_idempotent(db_url, tmp_path):
    redactor = Redactor(["EMAIL_ADDRESS", "PHONE_NUMBER", "STUDENT_ID"], r"\b[A-Z]{1,3}\d{6,9}\b")
    log = GenerationLog(db_url, tmp_path / "spill.jsonl", Metrics(), redactor, flush_seconds=0.01)
    await log.start()
    prefix = uuid.uuid4().hex[:8]  # the PostgreSQL database outlives a test run
    written = {**row(f"{prefix}-a"), "messages": [{"role": "user", "content": "mail ann@uni.edu please"}]}
    log.record(GenerationRecord.from_dict(written))
    await log.flush()
    stored = await log.get(f"{prefix}-a")
    assert stored["messages"][0]["content"] == "mail <EMAIL_ADDRESS> please"

    # A spill file from an outage holds a row that also reached the database, and one that did not.
    spilled = [row(f"{prefix}-a"), row(f"{prefix}-b")]
    (tmp_path / "spill.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in spilled))
    assert await log.replay_spill() == 2
    assert (await log.get(f"{prefix}-b"))["status"] == "ok"
    async with log.engine.connect() as connection:
        count = (await connection.execute(
            text("select count(*) from generations where id like :p"), {"p": f"{prefix}-%"})).scalar_one()
    assert count == 2 and not log.has_spill()
    await log.close()


async def test_an_unreachable_database_at_start_loses_nothing(tmp_path):
    url = "postgresql+asyncpg://zephyr:zephyr@127.0.0.1:9/none"  # nothing listens on the discard port
    log = GenerationLog(url, tmp_path / "spill.jsonl", Metrics(), None, flush_seconds=0.01, retry_seconds=60)
    await log.start()
    for i in range(3):
        log.record(GenerationRecord.from_dict(row(f"down-{i}")))
    await log.flush()
    await log.close()
    assert [json.loads(line)["id"] for line in (tmp_path / "spill.jsonl").read_text().splitlines()] == [
        "down-0", "down-1", "down-2"]
