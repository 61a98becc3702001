"""Retention: log rows older than the cutoff go with their review candidates; items under review stay unless
asked, and then go with their assignments. On SQLite and on a real PostgreSQL (a fresh database each)."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, insert, select
from typer.testing import CliRunner

from service.store import retention
from service.store.models import Generation, ReviewAssignment
from tests.review_data import fresh_db_url, generation, open_log, pair, seed  # noqa: F401 (fixture)

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=100)
CUTOFF = NOW - timedelta(days=90)
QUESTION = "Why is the sky blue?"


def at(when: datetime, rows: list[dict]) -> list[dict]:
    """`rows` moved in time, the first to `when`, the rest as far after it as they were."""
    return [{**r, "created_at": when + (r["created_at"] - rows[0]["created_at"])} for r in rows]


async def seeded(url: str, tmp_path):
    log = await open_log(url, tmp_path)
    await seed(log, [
        *at(OLD, pair("old-unreviewed", QUESTION, "Scattering.", "Rayleigh.")),
        *at(OLD, pair("old-judged", QUESTION, "Scattering.", "Rayleigh.")),
        *at(NOW, pair("recent", QUESTION, "Scattering.", "Rayleigh.")),
        {**generation("orphan-cand", [], "x", created_at=OLD, purpose="candidate", parent_id="gone")},
        {**generation("recent-chat", [], "x", created_at=NOW)},
    ])
    async with log.engine.begin() as conn:
        await conn.execute(insert(ReviewAssignment).values(
            item_id="old-judged", reviewer="r" * 64, status="judged", shown_at=OLD, left_id="old-judged",
            right_id="old-judged-cand", verdict="a", chosen_id="old-judged", flags=[], judged_at=OLD))
    return log


async def ids(log) -> set[str]:
    async with log.engine.connect() as conn:
        return set((await conn.execute(select(Generation.id))).scalars())


async def test_old_rows_go_with_their_candidates_and_reviewed_items_stay(fresh_db_url, tmp_path):  # noqa: F811
    log = await seeded(fresh_db_url, tmp_path)
    recent_pair = {"recent", "recent-cand"}
    counted = await retention.count_prunable(log.engine, CUTOFF)
    pruned = await retention.prune(log.engine, CUTOFF, batch=1)  # one served row a transaction: batches add up
    assert (counted.served, counted.children, counted.assignments) == (pruned.served, pruned.children, 0) == (2, 1, 0)
    assert await ids(log) == {"old-judged", "old-judged-cand", "recent-chat"} | recent_pair
    assert (await retention.prune(log.engine, CUTOFF)).rows == 0  # run again: nothing left to do

    everything = await retention.prune(log.engine, CUTOFF, include_reviewed=True)
    assert (everything.served, everything.children, everything.assignments) == (1, 1, 1)
    assert await ids(log) == {"recent-chat"} | recent_pair
    async with log.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(ReviewAssignment))).scalar_one() == 0
    await log.close()


async def test_an_item_claimed_after_the_prune_chose_it_is_kept_with_its_candidate(fresh_db_url, tmp_path,  # noqa: F811
                                                                                   monkeypatch):
    """A reviewer's claim between the prune's select and its deletes left an assignment of a deleted item: every
    later request of that reviewer was a 500. The select is made to miss the claim here, as a race would."""
    log = await seeded(fresh_db_url, tmp_path)
    selects = [True]  # the first select misses the claim; the next ones see it, as after a real race

    def racing(cutoff, include_reviewed, select=retention._prunable):
        return select(cutoff, selects.pop() if selects else include_reviewed)

    monkeypatch.setattr(retention, "_prunable", racing)
    pruned = await retention.prune(log.engine, CUTOFF)
    assert {"old-judged", "old-judged-cand"} <= await ids(log)  # claimed: kept, and its candidate with it
    assert not {"old-unreviewed", "old-unreviewed-cand", "orphan-cand"} & await ids(log)
    assert (pruned.served, pruned.children) == (2, 1)
    await log.close()


def rejected_lines(when: datetime) -> list[str]:
    """A rejected file's kinds of line, dated `when`: a refused row, a set-aside line, and a blank line."""
    return [json.dumps({"id": f"refused-{when:%j}", "created_at": when.isoformat(), "prompt_tokens": None}) + "\n",
            json.dumps({"unparseable_line": '{"torn', "_set_aside_at": when.isoformat()}) + "\n", "\n"]


def test_the_rejected_file_keeps_only_lines_inside_the_retention(tmp_path):
    path = tmp_path / "generations.rejected.jsonl"
    assert retention.prune_rejected(path, CUTOFF) == 0  # no file: nothing to do, nothing made
    assert not path.exists()
    recent = rejected_lines(NOW)
    path.write_text("".join(rejected_lines(OLD) + recent))
    before = path.read_text()
    assert retention.prune_rejected(path, CUTOFF, dry_run=True) == 2 and path.read_text() == before
    assert retention.prune_rejected(path, CUTOFF) == 2
    assert path.read_text() == "".join(line for line in recent if line.strip())
    assert retention.prune_rejected(path, CUTOFF) == 0

    # An older version's set-aside lines name no time: they are as old as the file's last write, and stamped with
    # it, so later appends (which move the file's time) do not keep them young.
    path.write_bytes(b'{"unparseable_line": "{\\"torn"}\nnot even json \xff\n')
    os.utime(path, (OLD.timestamp(), OLD.timestamp()))
    assert retention.prune_rejected(path, CUTOFF, dry_run=True) == 2
    assert b"\xff" in path.read_bytes()  # a dry run stamps nothing
    assert retention.prune_rejected(path, NOW - timedelta(days=200)) == 0  # kept, now dated
    stamped = [json.loads(line) for line in path.read_text(errors="surrogateescape").splitlines()]
    assert [set(entry) for entry in stamped] == [{"unparseable_line", "_set_aside_at"}] * 2
    assert stamped[1]["unparseable_line"] == "not even json \udcff"  # a byte that is no UTF-8, kept as it was
    with path.open("a") as out:  # an append moves the file's time, not the lines'
        out.write(rejected_lines(NOW)[0])
    assert retention.prune_rejected(path, CUTOFF) == 2 and len(path.read_text().splitlines()) == 1


async def test_the_servers_prune_waits_for_a_replay_writing_the_rejected_file(tmp_path):
    """A file lock does not exclude within one process: the prune's rewrite would cut off a row the replay appended
    after the prune read the file."""
    from service.metrics import Metrics
    from service.store.log import GenerationLog

    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None)
    log.rejected_path.write_text("".join(rejected_lines(OLD)))
    async with log._replay_lock:
        pruning = asyncio.create_task(log.prune_rejected(CUTOFF))
        await asyncio.sleep(0.1)
        assert not pruning.done() and len(log.rejected_path.read_text().splitlines()) == 3
    assert await pruning == 2


async def test_the_server_prunes_past_its_retention(app_factory, monkeypatch):
    from service import app as app_module

    monkeypatch.setattr(app_module, "RETENTION_INTERVAL_SECONDS", 0.05)
    async with app_factory(log_retention_days=90) as served:
        log = served.app.state.generation_log
        log.rejected_path.parent.mkdir(exist_ok=True)
        log.rejected_path.write_text("".join(rejected_lines(OLD) + rejected_lines(NOW)))
        await seed(log, at(OLD, pair("old-unreviewed", QUESTION, "Scattering.", "Rayleigh.")))
        # two rows and the rejected file's two old lines; the counter moves as each batch commits
        for _ in range(200):
            if "zephyr_log_pruned_rows_total 4.0" in (await served.client.get("/metrics")).text:
                break
            await asyncio.sleep(0.05)
        assert "zephyr_log_pruned_rows_total 4.0" in (await served.client.get("/metrics")).text
        assert not {"old-unreviewed", "old-unreviewed-cand"} & await ids(log)
        assert "refused-" + f"{NOW:%j}" in log.rejected_path.read_text()
        assert "refused-" + f"{OLD:%j}" not in log.rejected_path.read_text()


def test_the_cli_counts_then_prunes(tmp_path, monkeypatch):
    from cli.app import app

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path))
    url = f"sqlite+aiosqlite:///{tmp_path / 'zephyr.db'}"

    async def left() -> set[str]:
        log = await open_log(url, tmp_path)
        try:
            return await ids(log)
        finally:
            await log.close()

    async def prepare() -> None:
        await (await seeded(url, tmp_path)).close()

    asyncio.run(prepare())
    before = asyncio.run(left())
    rejected = tmp_path / "spill" / "generations.rejected.jsonl"  # beside the default spill file
    rejected.parent.mkdir(exist_ok=True)
    rejected.write_text("".join(rejected_lines(OLD) + rejected_lines(NOW)))
    rejected_before = rejected.read_text()
    runner = CliRunner()
    dry = runner.invoke(app, ["log", "prune", "--older-than-days", "90", "--dry-run"])
    assert dry.exit_code == 0 and "Would delete" in dry.output, dry.output
    assert asyncio.run(left()) == before and rejected.read_text() == rejected_before
    done = runner.invoke(app, ["log", "prune", "--older-than-days", "90"])
    assert done.exit_code == 0 and "Deleted" in done.output, done.output
    assert before - asyncio.run(left()) == {"old-unreviewed", "old-unreviewed-cand", "orphan-cand"}
    assert len(rejected.read_text().splitlines()) == 2  # the recent refused row and set-aside line
    # Reviewed items go only when asked, and the command asks first: their verdicts are the preference data.
    kept = asyncio.run(left())
    declined = runner.invoke(app, ["log", "prune", "--older-than-days", "90", "--include-reviewed"], input="n\n")
    assert declined.exit_code == 1 and "with its reviewers' verdicts" in " ".join(declined.output.split())
    assert asyncio.run(left()) == kept
    confirmed = runner.invoke(app, ["log", "prune", "--older-than-days", "90", "--include-reviewed", "--yes"])
    assert confirmed.exit_code == 0 and asyncio.run(left()) < kept, confirmed.output
    refused = runner.invoke(app, ["log", "prune", "--older-than-days", "0"])
    assert refused.exit_code != 0 and "older-than-days" in refused.output


def test_a_database_the_cli_cannot_reach_is_one_line_without_its_password(tmp_path, monkeypatch):
    """asyncpg's refused connection is an OSError, not SQLAlchemy's: it escaped as a traceback."""
    from cli.app import app

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path))
    monkeypatch.setenv("ZEPHYR_DB_URL", "postgresql+asyncpg://tutor:hunter2@127.0.0.1:1/zephyr")
    for command in (["log", "prune", "--older-than-days", "90"], ["review", "stats"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "127.0.0.1:1/zephyr" in result.output and "hunter2" not in result.output
        assert "tutor" not in result.output
