"""How long students' conversations stay in the generation log.

A served generation older than the cutoff goes, with what hangs off it (its review candidate and any other row
whose `parent_id` names it). Items reviewers judged, skipped or hold are kept: their verdicts are the preference
data. `include_reviewed` deletes those too, with their review assignments: a retention that covers everything,
once the verdicts are exported. Rows go a batch at a time, each in its own transaction, so a large first prune
never holds the database for long; run again, it picks up where it stopped.

The spill's rejected file (rows the database refused, kept on disk for a person) holds students' words too:
`prune_rejected` holds it to the same cutoff."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exists, func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import aliased

from service.store.models import SET_ASIDE_KEY, Generation, ReviewAssignment
from zephyr.clock import utc

BATCH = 500  # served rows a transaction deletes (with their children)


@dataclass
class Pruned:
    served: int = 0  # served generations (and orphaned children older than the cutoff)
    children: int = 0  # their review candidates and other rows that name them as parent
    assignments: int = 0  # review assignments (include_reviewed only)

    @property
    def rows(self) -> int:
        return self.served + self.children


def _prunable(cutoff: datetime, include_reviewed: bool):
    """Generations older than the cutoff that are no one's child (served rows; a child whose parent is already gone
    counts as its own), and, unless include_reviewed, that are no review assignment's item. (An assignment shows
    its item and the item's candidate, so the item, an indexed column, says which rows it holds.)"""
    G, A, P = Generation, ReviewAssignment, aliased(Generation)
    query = select(G.id).where(G.created_at < utc(cutoff),
                               (G.parent_id.is_(None)) | ~exists().where(P.id == G.parent_id))
    if not include_reviewed:
        query = query.where(~exists().where(A.item_id == G.id))
    return query


async def count_prunable(engine: AsyncEngine, cutoff: datetime, include_reviewed: bool = False) -> Pruned:
    """What prune() would delete now (a dry run)."""
    roots = _prunable(cutoff, include_reviewed).subquery()
    async with engine.connect() as conn:
        served = (await conn.execute(select(func.count()).select_from(roots))).scalar_one()
        children = (await conn.execute(select(func.count()).select_from(Generation).where(
            Generation.parent_id.in_(select(roots.c.id))))).scalar_one()
        assignments = (await conn.execute(select(func.count()).select_from(ReviewAssignment).where(
            ReviewAssignment.item_id.in_(select(roots.c.id))))).scalar_one() if include_reviewed else 0
    return Pruned(served, children, assignments)


async def prune(engine: AsyncEngine, cutoff: datetime, include_reviewed: bool = False, batch: int = BATCH,
                on_batch: Callable[[Pruned], None] | None = None) -> Pruned:
    """Delete what count_prunable counts, a batch of served rows per transaction; `on_batch` hears of each batch
    as it commits (a later one failing leaves the earlier ones deleted, and counted)."""
    pruned = Pruned()
    G, A, P = Generation, ReviewAssignment, aliased(Generation)
    while True:
        async with engine.begin() as conn:
            # A reviewer's claim of one of these rows may land between the select and the deletes: SQLite's driver
            # opens its transaction at the first write, and without enforced foreign keys the claim would keep an
            # assignment of a deleted item (every later request of that reviewer's a 500). BEGIN IMMEDIATE holds
            # SQLite's write lock from the select on. On PostgreSQL a claim locks the item's row (FOR UPDATE) before
            # it inserts: the select locks the rows it takes, skipping any a claim holds, so a claim either waits and
            # finds its item gone or keeps it from this batch (a DELETE that waited on a row lock would not look
            # for the new assignment again, and its foreign key would fail the batch).
            chosen = _prunable(cutoff, include_reviewed).order_by(G.created_at).limit(batch)
            if conn.dialect.name == "sqlite":
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            elif conn.dialect.name == "postgresql":
                chosen = chosen.with_for_update(of=G, skip_locked=True)
            ids = list((await conn.execute(chosen)).scalars())
            if not ids:
                return pruned
            done = Pruned()
            if include_reviewed:  # the assignments first: their item is a foreign key
                done.assignments = (await conn.execute(delete(A).where(A.item_id.in_(ids)))).rowcount
            served = delete(G).where(G.id.in_(ids))
            if not include_reviewed:
                served = served.where(~exists().where(A.item_id == G.id))
            done.served = (await conn.execute(served)).rowcount
            # then the children of those that went (not of one a claim kept meanwhile)
            done.children = (await conn.execute(delete(G).where(
                G.parent_id.in_(ids), ~exists().where(P.id == G.parent_id)))).rowcount
        pruned.served += done.served
        pruned.children += done.children
        pruned.assignments += done.assignments
        if on_batch is not None:
            on_batch(done)


def _dated(entry: dict[str, Any]) -> datetime | None:
    """A rejected line's time: the row's `created_at`, else when it was set aside; None if it names neither."""
    for key in ("created_at", SET_ASIDE_KEY):
        try:
            return utc(datetime.fromisoformat(entry[key]))
        except (KeyError, TypeError, ValueError):
            continue
    return None


def prune_rejected(path: Path, cutoff: datetime, dry_run: bool = False) -> int:
    """Delete the lines of the rejected file `path` older than the cutoff; how many went (or would go).

    A line that names no time of its own (one an older version set aside) is dated by the file's last write, and
    stamped with it, so it ages from then on instead of with every append. The file is rewritten in place under
    the lock its writers take: another process appending meanwhile waits and loses nothing (POSIX locks do not
    exclude within one process: the server calls this through GenerationLog.prune_rejected, which holds the
    replay's lock too). Bytes that are no UTF-8 are kept as they were."""
    try:
        handle = path.open("r+", encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return 0
    cutoff = utc(cutoff)
    with handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        written = datetime.fromtimestamp(os.fstat(handle.fileno()).st_mtime, UTC)
        kept, gone, stamped = [], 0, False
        for line in handle:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict):
                entry = {"unparseable_line": line.rstrip("\n")}
            when = _dated(entry)
            if when is None:
                when, stamped = written, True
                line = json.dumps({**entry, SET_ASIDE_KEY: written.isoformat()}) + "\n"
            if when < cutoff:
                gone += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
        if (gone or stamped) and not dry_run:
            handle.seek(0)
            handle.writelines(kept)
            handle.truncate()
            handle.flush()
            os.fsync(handle.fileno())
    return gone
