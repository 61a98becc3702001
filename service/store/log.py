"""The generation log: rows are queued on the request path and written in batches by one background task.

Nothing logged is lost: a batch the database refuses goes to a local JSON Lines spill file (fsynced), which
is replayed, idempotently by request id, once the database answers again; shutdown flushes the queue.

Rows are PII-redacted before they reach the database or the disk (see `GenerationLog._redact` for the fields),
and what is kept on disk is private: the SQLite file, its journals and the spill files are 0600, their folders
0700 (zephyr/paths.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError as AlembicError
from sqlalchemy import func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.metrics import Metrics
from service.store import retention
from service.store.models import SET_ASIDE_KEY, Generation, GenerationRecord, json_default
from zephyr.paths import (
    create_private_file,
    open_private_append,
    private_dir,
    private_file,
    private_sqlite_files,
    sqlite_path,
)
from zephyr.pii import Redactor

log = logging.getLogger("zephyr.store")
ALEMBIC_INI = Path(__file__).with_name("alembic.ini")
REDACTED_FIELDS = ("messages", "response")  # GenerationRecord fields: lists of {"content": text, ...}
REDACTED_PARAMS = ("stop",)  # request parameters that are the client's own text (a list of strings)
CLOSE_TIMEOUT_SECONDS = 10.0
USER_COLUMN_LENGTH = 256


def alembic_config(url: str) -> Config:
    config = Config(str(ALEMBIC_INI))
    # Alembic's options interpolate `%(name)s`: a `%` of the URL's own (an Azure user `u@server` is written
    # `u%40server`, a path may hold one) failed every start, and every row went to the spill file.
    config.set_main_option("script_location", str(ALEMBIC_INI.parent / "migrations").replace("%", "%%"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


async def upgrade_schema(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the database to a migration (by default the newest) on the server's own engine. A database a newer
    version migrated past what this one knows (a rollback) is written as it is: the migrations add tables and
    nullable columns only, so this version's rows still fit. Upgrading it failed at every start and every retry,
    and every row went to the spill file for as long as the older version ran."""

    def _upgrade(connection) -> None:
        hold_for_migrations(connection)
        config = alembic_config(str(engine.url))
        config.attributes["connection"] = connection
        known = ScriptDirectory.from_config(config)
        current = MigrationContext.configure(connection).get_current_heads()
        ahead = [head for head in current if not _knows(known, head)]
        if ahead:
            log.warning("the log database is at migration %s, which this version does not know (a newer version "
                        "migrated it; newest known here: %s): writing to it as it is. Leave the schema as it is: "
                        "this version's rows fit it, and a downgrade (the newer version's `alembic -c "
                        "service/store/alembic.ini downgrade %s`) drops what its migrations added, verdicts "
                        "included when it goes past 0002",
                        ", ".join(ahead), known.get_current_head(), known.get_current_head())
            return
        command.upgrade(config, revision)

    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)


# Any constant of ours: the key of the PostgreSQL advisory lock that migrating replicas take in turn.
MIGRATION_LOCK_KEY = 0x7A65_7068  # "zeph"


def hold_for_migrations(connection) -> None:
    """Makes the migrations that follow on this connection one transaction, taken by one migrator at a time.
    SQLite: Python's driver opens a transaction only before INSERT/UPDATE/DELETE, so each ALTER and CREATE INDEX
    committed alone; a migration stopped half way (a kill, a full disk) left columns that made every later try fail
    ("duplicate column name") and the log spill for good. An explicit BEGIN IMMEDIATE makes them atomic (SQLite's
    DDL is transactional) and keeps a second migrator out. PostgreSQL's DDL is transactional already; replicas
    starting together both migrated, and the loser failed ("already exists") and spilled until its next probe."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")


def _knows(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except AlembicError:
        return False


def rejected_file(spill_path: Path) -> Path:
    """Where spilled rows the database refused are kept for a person to look at."""
    return spill_path.with_name(spill_path.stem + ".rejected.jsonl")


def _ends_mid_line(path: Path) -> bool:
    """Whether the file's last line is cut off: the next line appended would join it, and both be unreadable."""
    try:
        with path.open("rb") as handle:
            if handle.seek(0, os.SEEK_END) == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except FileNotFoundError:
        return False


def make_engine(url: str) -> AsyncEngine:
    """The engine for a database URL. A SQLite file's folder is made private (0700; $ZEPHYR_HOME by default),
    and the file is created 0600 before SQLite opens it (SQLite gives its journals the database's mode)."""
    database = sqlite_path(url)
    if database is not None:
        private_dir(database.parent)
        create_private_file(database)
    # hide_parameters: a failed statement's error (logged) would otherwise quote the row, a student's words included
    return create_async_engine(url, pool_pre_ping=True, hide_parameters=True)



def refused_for_its_rows(exc: BaseException) -> bool:
    """Whether the database refused rows for what they hold (SQLSTATE class 22, a value its column cannot take; 23,
    a constraint; or a value that could not be bound), rather than failed itself: a lock held past the timeout, a
    server read-only after a failover, a full disk. Only the first sets rows aside; the second keeps the spill file
    for the next try (a `SELECT 1` succeeds through all of them, so it cannot tell them apart)."""
    if isinstance(exc, IntegrityError | DataError):
        return True
    if isinstance(exc, DBAPIError):  # asyncpg's class 22 errors arrive as a plain DBAPIError
        # SQLite's driver names a value of a type no column takes (a list where text goes) a ProgrammingError
        return ((getattr(exc.orig, "sqlstate", None) or "")[:2] in ("22", "23")
                or "binding parameter" in str(exc.orig).lower())
    return isinstance(exc, StatementError | ValueError | TypeError | OverflowError)

class GenerationLog:
    def __init__(
        self,
        url: str,
        spill_path: Path,
        metrics: Metrics,
        redactor: Redactor | None,
        batch_size: int = 64,
        flush_seconds: float = 0.5,
        queue_size: int = 10_000,
        retry_seconds: float = 5.0,
        enabled: bool = True,
    ):
        self.enabled = enabled  # False: rows are dropped at once (benchmarks of the log's own cost)
        self.engine = make_engine(url)
        self.spill_path = Path(spill_path)
        self.metrics = metrics
        self.redactor = redactor
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.retry_seconds = retry_seconds
        self.queue: asyncio.Queue[GenerationRecord] = asyncio.Queue(maxsize=queue_size)
        self._database = sqlite_path(url)
        self._writer: asyncio.Task | None = None
        self._db_ok = False
        self._next_probe = 0.0
        self._in_flight: list[GenerationRecord] = []
        # Rows a full queue could not take: spilled by a thread, since redaction and fsync would stall every
        # stream on the loop (record() runs on it).
        self._overflow: list[GenerationRecord] = []
        self._closed = False  # set once close() has taken what was queued: a later row goes straight to disk
        self._overflow_spill: asyncio.Task | None = None
        # One writer of the spill file at a time: a thread's append must not interleave with another's, nor land
        # in a file replay_spill has already read.
        self._spill_lock = threading.Lock()
        # One replay at a time in this process (POSIX locks do not exclude within one): the start's, in the
        # background, and the writer's after a batch.
        self._replay_lock = asyncio.Lock()
        self._startup_replay: asyncio.Task | None = None

    # Life cycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._make_private()
        try:
            await upgrade_schema(self.engine)
            self._db_ok = True
            self._make_private()
        except Exception as exc:  # the service still serves; rows spill until the database returns
            log.error("generation log database unavailable at start (%s); spilling to %s", exc, self.spill_path)
        else:
            if self.has_spill():
                # In the background: a long outage's spill could outlast the startup probe, and serving need
                # not wait for rows that are already safe on disk.
                self._startup_replay = asyncio.create_task(self._replay_logged(), name="generation-log-replay")
        self._writer = asyncio.create_task(self._run(), name="generation-log-writer")

    async def replayed_at_start(self) -> None:
        """Wait for the replay the start began, if any (tests, and tools that want the log complete)."""
        if self._startup_replay is not None:
            await asyncio.shield(self._startup_replay)

    async def _replay_logged(self) -> None:
        try:
            await self.replay_spill()
        except Exception:  # the spill file stays; the writer retries after its next batch
            log.exception("replaying the spill file failed; will retry")

    async def close(self) -> None:
        """Flush every queued row (to the database, or else to the spill file), then stop."""
        try:
            await asyncio.wait_for(self.flush(), CLOSE_TIMEOUT_SECONDS)
        except TimeoutError:
            log.warning("generation log still writing after %ss at shutdown; spilling the rest", CLOSE_TIMEOUT_SECONDS)
        # Left only if the flush timed out: a batch cut off mid-write and what was still queued. Spill them
        # rather than wait on a slow database (a replayed duplicate is ignored by request id). Read once the
        # writer is stopped: while the start's replay is cancelled, the writer may yet take another batch.
        if self._startup_replay is not None:  # a taken file cut off part way is replayed by the next start
            self._startup_replay.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._startup_replay
        if self._writer is not None:
            self._writer.cancel()
            # bounded: a writer that outlived its cancel must not hold the shutdown (and the rows still queued)
            await asyncio.wait({self._writer}, timeout=CLOSE_TIMEOUT_SECONDS)
            if not self._writer.done():  # its rows may be spilled twice below: replay ignores the second by id
                log.warning("the generation-log writer still ran %ss after it was stopped; spilling what it held",
                            CLOSE_TIMEOUT_SECONDS)
            elif not self._writer.cancelled():
                self._writer.exception()  # retrieved: an error of its own is no "never retrieved" warning
        leftover = list(self._in_flight)
        self._closed = True
        while not self.queue.empty():
            leftover.append(self.queue.get_nowait())
            self.queue.task_done()
        await self._overflow_spilled()
        if leftover:  # off the loop (it redacts), and a disk that refuses is counted, not raised past dispose()
            await asyncio.to_thread(self._spill_or_count_lost, leftover)
        self._in_flight = []
        self.metrics.log_queue_depth.set(0)
        await self.engine.dispose()

    # Request path -----------------------------------------------------------------------------------

    def record(self, row: GenerationRecord) -> None:
        """Queue one row; never blocks and never drops: a full queue spills the row to disk, off the loop."""
        if not self.enabled:
            return
        if self._closed:
            # A request the server's stop cancelled, whose row came after the log closed (uvicorn cancels what
            # is left of its requests and shuts down without waiting for them): nobody reads the queue now.
            log.warning("a generation log row came after the log closed; spilling it to %s", self.spill_path)
            self._spill_or_count_lost([row])  # redacted, as every row on disk is; rare: a request finishing late
            return
        try:
            self.queue.put_nowait(row)
        except asyncio.QueueFull:
            self._overflow.append(row)
            if self._overflow_spill is None or self._overflow_spill.done():
                self._overflow_spill = asyncio.get_running_loop().create_task(self._spill_overflow(),
                                                                             name="generation-log-overflow")
        self.metrics.log_queue_depth.set(self.queue.qsize())

    async def _spill_overflow(self) -> None:
        while self._overflow:
            rows, self._overflow = self._overflow, []
            await asyncio.to_thread(self._spill_or_count_lost, rows)  # the queue full: to disk

    async def _overflow_spilled(self) -> None:
        while self._overflow_spill is not None and not self._overflow_spill.done():
            await asyncio.shield(self._overflow_spill)

    async def flush(self) -> None:
        """Wait until every row recorded so far is in the database or the spill file."""
        await self.queue.join()
        await self._overflow_spilled()

    # Writer -----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            # In flight from its first row: a close that times out while the batch is still being gathered
            # spills what was taken off the queue too.
            self._in_flight = batch = [await self.queue.get()]
            deadline = asyncio.get_running_loop().time() + self.flush_seconds
            while len(batch) < self.batch_size:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    # Not wait_for: on Python 3.11 it swallows a cancel that lands as the get() completes, and the
                    # writer ran on after close() had cancelled it, which then waited for it forever.
                    async with asyncio.timeout(remaining):
                        batch.append(await self.queue.get())
                except TimeoutError:
                    break
            try:
                try:
                    await self._write(batch)
                except Exception:  # the writer must outlive any one bad batch; its rows go to disk instead
                    log.exception("generation log writer error; spilling %d rows", len(batch))
                    await asyncio.to_thread(self._spill_or_count_lost, batch)
                if self._db_ok and not self._replay_lock.locked() and self.has_spill():
                    # the batch above is already stored; a failed replay leaves the file for a retry
                    await self._replay_logged()
            except asyncio.CancelledError:
                raise  # stopped mid-batch: `close` spills what `_in_flight` still holds
            else:
                self._in_flight = []
            finally:
                for _ in batch:
                    self.queue.task_done()
            self.metrics.log_queue_depth.set(self.queue.qsize())

    async def _write(self, rows: list[GenerationRecord]) -> None:
        redacted, unredactable = await asyncio.to_thread(self._redact_each, rows)
        if unredactable:  # each alone: one row the redactor fails on sent the whole batch to disk unredacted
            log.error("redaction failed on %d row(s); spilled to local disk as they are, retried at replay",
                      len(unredactable))
            await asyncio.to_thread(self._spill, unredactable)
        if not redacted:
            return
        if not self._db_ok and not await self._probe():
            await asyncio.to_thread(self._spill, redacted)
            return
        try:
            await self._insert(redacted)
            self.metrics.log_rows_written.inc(len(redacted))
        except Exception as exc:
            self._db_ok = False
            self.metrics.log_write_failures.inc()
            log.warning("generation log write failed (%s); %d rows spilled to %s", exc, len(rows), self.spill_path)
            await asyncio.to_thread(self._spill, redacted)

    async def _probe(self) -> bool:
        """Is the database back? Checked at most every retry_seconds while it is down."""
        now = asyncio.get_running_loop().time()
        if now < self._next_probe:
            return False
        self._next_probe = now + self.retry_seconds
        try:
            await upgrade_schema(self.engine)
        except Exception:
            return False
        log.info("generation log database is back")
        self._db_ok = True
        self._make_private()  # a database that was recreated meanwhile
        return True

    def _make_private(self) -> None:
        """Tighten what already exists (files an older version, or SQLite, made with the umask's mode)."""
        if self._database is not None:
            private_sqlite_files(self._database)
        if self.spill_path.parent.exists():
            private_dir(self.spill_path.parent)
        for path in (self.spill_path, self._lock_path, self.rejected_path, *self._replaying_files()):
            private_file(path)

    async def _insert(self, rows: list[GenerationRecord]) -> None:
        if not rows:
            return
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            statement = pg_insert(Generation).on_conflict_do_nothing(index_elements=["id"])
        elif dialect == "sqlite":
            statement = sqlite_insert(Generation).on_conflict_do_nothing(index_elements=["id"])
        else:
            statement = insert(Generation)
        async with self.engine.begin() as connection:
            await connection.execute(statement, [row.columns() for row in rows])

    def _redact(self, row: GenerationRecord) -> GenerationRecord:
        """The row with its free text redacted: a new record, the one given is left as it is."""
        if self.redactor is None or row.redacted:
            return row
        redact = self.redactor.redact
        changes: dict[str, Any] = {
            field: [
                {**item, "content": redact(item["content"])} if isinstance(item.get("content"), str)
                else item
                for item in getattr(row, field)
            ]
            for field in REDACTED_FIELDS
        }
        if isinstance(row.user, str):  # meant as an opaque id, but students type emails there too
            changes["user"] = redact(row.user)[:USER_COLUMN_LENGTH]
        params = row.params
        if isinstance(params, dict):
            texts = {name: params[name] for name in REDACTED_PARAMS if isinstance(params.get(name), list)}
            if texts:
                params = {**params, **{name: [redact(v) if isinstance(v, str) else v for v in values]
                                       for name, values in texts.items()}}
            withheld = params.get("answer_safety")
            if isinstance(withheld, dict):  # the model's sentence the answer guard withheld, shown to reviewers
                params = {**params, "answer_safety": {
                    index: {**verdict, "sentence": redact(verdict["sentence"])}
                    if isinstance(verdict, dict) and isinstance(verdict.get("sentence"), str) else verdict
                    for index, verdict in withheld.items()}}
            if params is not row.params:
                changes["params"] = params
        if isinstance(row.error, str):  # an engine's message may quote the request
            changes["error"] = redact(row.error)
        return dataclasses.replace(row, **changes, redacted=True)

    # Spill file -------------------------------------------------------------------------------------

    # Replicas that share a volume share the spill file: appends, taking the file for a replay and replaying a
    # taken file each hold a POSIX lock (fcntl.lockf: byte-range locks, which NFS and other shared volumes carry
    # between hosts), so no pod replays or renames what another is writing or replaying. The process's own
    # `_spill_lock` orders its threads, which POSIX locks do not.

    @property
    def _lock_path(self) -> Path:
        return self.spill_path.with_suffix(".lock")

    def _replaying_files(self) -> list[Path]:
        """Files taken for replay: this process's, another replica's, or one a pod that died left behind (the
        plain `.replaying` name is the one earlier versions used)."""
        folder = self.spill_path.parent
        if not folder.is_dir():
            return []

        def age(path: Path) -> tuple[float, str]:
            try:
                return path.stat().st_mtime, path.name
            except FileNotFoundError:  # replayed and removed by another replica since the listing
                return 0.0, path.name

        # this spill file's own: "spill.<id>.replaying" (and an older version's "spill.replaying"), not those of
        # another spill path in the folder whose name starts alike ("spill2.jsonl", "spill.v2.jsonl")
        own = re.compile(rf"{re.escape(self.spill_path.stem)}(?:\.[0-9a-f]+)?\.replaying")
        return sorted((path for path in folder.glob("*.replaying") if own.fullmatch(path.name)), key=age)

    def has_spill(self) -> bool:
        return self.spill_path.exists() or bool(self._replaying_files())

    @contextlib.contextmanager
    def _spill_file_lock(self) -> Iterator[None]:
        with self._spill_lock, open_private_append(self._lock_path) as lock:
            fcntl.lockf(lock, fcntl.LOCK_EX)  # blocks while another replica appends or takes the file
            yield

    def _spill(self, rows: list[GenerationRecord]) -> None:
        private_dir(self.spill_path.parent)
        with self._spill_file_lock(), open_private_append(self.spill_path) as handle:
            if _ends_mid_line(self.spill_path):  # a write cut off (a kill, a full disk): its row is lost, not ours
                handle.write("\n")
            for row in rows:
                handle.write(row.to_json_line())
            handle.flush()
            os.fsync(handle.fileno())
        self.metrics.log_spilled_rows.inc(len(rows))

    def _spill_or_count_lost(self, rows: list[GenerationRecord]) -> None:
        """`_spill_safely`, and where the disk refuses too, nothing left to keep the rows in: said and counted."""
        try:
            self._spill_safely(rows)
        except OSError:
            log.critical("cannot write the spill file %s; %d log row(s) lost", self.spill_path, len(rows))
            self.metrics.log_write_failures.inc()

    def _spill_safely(self, rows: list[GenerationRecord]) -> None:
        redacted, unredactable = self._redact_each(rows)
        if unredactable:  # kept on local disk as they are, never dropped; only the rows the redactor fails on
            log.error("redaction failed on %d row(s) while spilling; written unredacted", len(unredactable))
        self._spill(redacted + unredactable)  # an OSError here is the disk's, not redaction's: raised as itself

    def _redact_each(self, rows: list[GenerationRecord]) -> tuple[list[GenerationRecord], list[GenerationRecord]]:
        """The rows redacted, and those the redactor failed on (as they are), one row at a time."""
        redacted, failed = [], []
        for row in rows:
            try:
                redacted.append(self._redact(row))
            except Exception:
                log.exception("redacting generation-log row %s failed", row.id)
                failed.append(row)
        return redacted, failed

    def _take_spill(self) -> None:
        """Renames the spill file, under a name of its own, for replaying, so new spills go to a fresh one."""
        if not self.spill_path.exists():
            return
        with self._spill_file_lock():  # no spill is half written into the file being renamed
            if self.spill_path.exists():
                self.spill_path.rename(self.spill_path.with_name(
                    f"{self.spill_path.stem}.{uuid.uuid4().hex[:12]}.replaying"))

    @property
    def rejected_path(self) -> Path:
        return rejected_file(self.spill_path)

    def _keep_rejected(self, rows: list[dict[str, Any]]) -> None:
        with open_private_append(self.rejected_path) as out:
            fcntl.lockf(out, fcntl.LOCK_EX)  # not between the retention's read and rewrite of the file
            for row in rows:
                out.write(json.dumps(row, default=json_default) + "\n")
            out.flush()  # on disk before the spill file they came from is deleted
            os.fsync(out.fileno())

    async def prune_rejected(self, cutoff: datetime) -> int:
        """service.store.retention.prune_rejected on this log's rejected file, under the replay's lock (the only
        writer of that file in this process: a file lock does not keep it out)."""
        async with self._replay_lock:
            return await asyncio.to_thread(retention.prune_rejected, self.rejected_path, cutoff)

    async def replay_spill(self) -> int:
        """Insert spilled rows (duplicates are ignored by request id), then remove the file. A row the
        database refuses while it is up (a bad value, a torn line) goes to the rejected file for a person
        to look at, instead of blocking every later replay. Every taken file is replayed that no other replica
        holds, a dead pod's too."""
        async with self._replay_lock:
            return await self._replay_taken_files()

    async def _replay_taken_files(self) -> int:
        replayed = 0
        # Files taken earlier first; the spill file is taken only once they are in, so a long outage leaves one
        # taken file waiting, not one for each retry.
        for take_spill in (False, True):
            if take_spill:  # in a thread: the lock may wait on a spill's write and fsync
                await asyncio.to_thread(self._take_spill)
            for path in await asyncio.to_thread(self._replaying_files):
                with contextlib.ExitStack() as held:
                    try:
                        handle = held.enter_context(path.open("r+", encoding="utf-8"))
                        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except FileNotFoundError:  # replayed and removed by another replica meanwhile
                        continue
                    except OSError:  # held: another replica is replaying it
                        continue
                    if not path.exists():  # removed between the listing and the lock
                        continue
                    count = await self._replay_file(path, handle)
                    if count is None:
                        return replayed
                    replayed += count
        return replayed

    async def _replay_file(self, path: Path, handle: Any) -> int | None:
        """One taken file, a batch at a time; None if the database failed part way (the file stays)."""
        # Set aside: lines that are no JSON, or JSON that is no row; refused: rows the database would not take.
        set_aside: list[dict[str, Any]] = []
        refused: list[GenerationRecord] = []
        inserted = 0
        # A batch at a time, however long the outage made the file: the server's memory holds one batch, and a
        # restart part way through inserts again what it had (ignored by request id).
        batches = self._spilled_batches(handle, set_aside)
        # A redactor that fails raises from here, as itself: the database is not to blame.
        while batch := await asyncio.to_thread(next, batches, None):
            try:
                try:
                    await self._insert(batch)
                except Exception as exc:
                    if not refused_for_its_rows(exc) or not await self._reachable():
                        raise
                    refused += await self._insert_one_by_one(batch)
            except Exception as exc:
                self._db_ok = False
                log.warning("replaying spilled rows failed (%s); will retry", exc)
                return None
            inserted += len(batch)
        # A set-aside line may carry no time of its own: its setting aside dates it for the retention.
        set_aside_at = datetime.now(UTC).isoformat()
        rejected = [{**entry, SET_ASIDE_KEY: set_aside_at} for entry in set_aside]
        rejected += [row.to_json() for row in refused]
        if rejected:
            # In a thread: the lock waits while another process prunes the file.
            await asyncio.to_thread(self._keep_rejected, rejected)
            self.metrics.log_rejected_rows.inc(len(rejected))
            log.error("%d spilled rows were refused by the database; kept in %s", len(rejected), self.rejected_path)
        await asyncio.to_thread(path.unlink)  # still locked: no other replica is reading it
        replayed = inserted - len(refused)
        self.metrics.log_replayed_rows.inc(replayed)
        log.info("replayed %d spilled generation-log rows", replayed)
        return replayed

    def _spilled_batches(self, lines: Iterator[str], set_aside: list[dict[str, Any]]
                         ) -> Iterator[list[GenerationRecord]]:
        """The spill file's rows, batch_size at a time and redacted (run in a thread: it parses and redacts).
        Rows spilled while redaction was failing are still raw: nothing reaches the database unredacted (a
        redactor still failing raises, and the file waits for the next try). Lines that are no row go to
        `set_aside`."""
        batch: list[GenerationRecord] = []
        unredactable: list[dict[str, Any]] = []  # raw rows the redactor fails on while it redacts others
        for line in lines:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                set_aside.append({"unparseable_line": line})
                continue
            try:
                row = GenerationRecord.from_dict(data)
            except ValueError as exc:
                log.warning("a spilled line is no generation row (%s); setting it aside", exc)
                set_aside.append(data if isinstance(data, dict) else {"unparseable_line": line})
                continue
            try:
                batch.append(self._redact(row))
            except Exception:
                # the redactor itself broken (not this row): the file waits for the next try, nothing set aside
                if not unredactable and not self._redactor_works():
                    raise
                log.exception("spilled row %s cannot be redacted; it is set aside in the rejected file", row.id)
                unredactable.append(data)
                continue
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
        # rows it fails on alone: set aside (as they were on disk), so that they block no later replay
        set_aside.extend({"unredactable_row": data} for data in unredactable)

    def _redactor_works(self) -> bool:
        """Whether the redactor redacts a plain text: a row it fails on is the row's fault, not its own."""
        try:
            self.redactor.redact("Write to jane@example.com about the lab.")
        except Exception:
            return False
        return True

    async def _insert_one_by_one(self, rows: list[GenerationRecord]) -> list[GenerationRecord]:
        """The rows the database refuses, each tried alone; raises when the database itself went away meanwhile
        (the rest are not the rows' fault: the file stays for the next try)."""
        refused = []
        for row in rows:
            try:
                await self._insert([row])
            except Exception as exc:
                if not refused_for_its_rows(exc) or not await self._reachable():
                    raise
                refused.append(row)
        return refused

    async def _reachable(self) -> bool:
        try:
            async with self.engine.connect() as connection:
                await connection.execute(select(1))
            return True
        except Exception:
            return False

    # Reading (tests, review tooling) ----------------------------------------------------------------

    async def count(self) -> int:
        async with self.engine.connect() as connection:
            return (await connection.execute(select(func.count()).select_from(Generation))).scalar_one()

    async def get(self, request_id: str) -> dict[str, Any] | None:
        async with self.engine.connect() as connection:
            row = (await connection.execute(select(Generation).where(Generation.id == request_id))).mappings().first()
        return dict(row) if row else None
