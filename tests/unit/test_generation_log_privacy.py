"""What the generation log keeps about students: every free-text field of a row is redacted (stop strings and
errors too), and what it writes to disk (SQLite file, spill files, their folders) is private whatever the umask."""

import json
import os
import shutil
import stat
from datetime import UTC, datetime

import pytest

from service.metrics import Metrics
from service.store.log import GenerationLog, make_engine
from service.store.models import GenerationRecord
from zephyr.paths import private_dir, private_sqlite_files, sqlite_path
from zephyr.pii import Redactor
from zephyr.settings import Settings

CHAT = "/v1/chat/completions"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def row(request_id: str, **fields) -> dict:
    return {
        "id": request_id, "created_at": datetime.now(UTC), "route": "chat", "model": "m", "api_key_hash": None,
        "role": "student", "user": None, "status": "ok", "messages": [{"role": "user", "content": "hi"}],
        "response": [{"index": 0, "content": "hello"}], "params": {}, "prompt_tokens": 1, "completion_tokens": 1,
        "ttft_ms": 1.0, "latency_ms": 2.0, "error": None, "review_requested": False, **fields,
    }


def record(request_id: str, **fields) -> GenerationRecord:
    """`row` as the log takes it."""
    return GenerationRecord.from_dict(row(request_id, **fields))


@pytest.fixture
def open_umask():
    """The loosest umask: the modes below must not depend on it."""
    previous = os.umask(0)
    yield
    os.umask(previous)


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    fields = Settings.model_fields
    return Redactor(fields["pii_entities"].default, fields["student_id_pattern"].default)


async def test_stop_strings_and_errors_are_redacted(tmp_path, redactor):
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), redactor,
                        flush_seconds=0.01)
    await log.start()
    log.record(record("r1", params={"stop": ["ann@uni.edu", "S1234567", "###"], "n": 1, "stream": False},
                   error="the engine refused stop string 'ann@uni.edu'", user="born 04/05/2009"))
    await log.flush()
    stored = await log.get("r1")
    assert stored["params"] == {"stop": ["<EMAIL_ADDRESS>", "<STUDENT_ID>", "###"], "n": 1, "stream": False}
    assert stored["error"] == "the engine refused stop string '<EMAIL_ADDRESS>'"
    assert stored["user"] == "born <DATE_OF_BIRTH>"
    await log.close()


async def test_the_sentence_the_answer_guard_withheld_is_redacted(tmp_path, redactor):
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), redactor,
                        flush_seconds=0.01)
    await log.start()
    verdict = {"category": "harmful", "score": 0.99, "sentence": "Write to jane.doe@example.com for the recipe."}
    log.record(record("r1", params={"answer_safety": {"0": verdict, "1": None}, "n": 2}))
    await log.flush()
    stored = await log.get("r1")
    assert stored["params"]["answer_safety"] == {
        "0": {"category": "harmful", "score": 0.99, "sentence": "Write to <EMAIL_ADDRESS> for the recipe."}, "1": None}
    await log.close()


async def test_a_chat_requests_stop_strings_reach_the_log_redacted(served):
    r = await served.client.post(CHAT, json={
        "messages": [{"role": "user", "content": "I live at 42 Elm Street"}], "max_tokens": 4,
        "stop": ["jane.doe@school.edu", "Student 20231234"],
    })
    assert r.status_code == 200, r.text
    stored = await (await served.flushed_log()).get(r.json()["id"])
    assert stored["params"]["stop"] == ["<EMAIL_ADDRESS>", "Student <STUDENT_ID>"]
    assert stored["messages"][-1]["content"] == "I live at <STREET_ADDRESS>"
    assert "jane.doe" not in json.dumps(stored, default=str)


async def test_the_database_and_its_folder_are_private(tmp_path, open_umask):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)  # as an earlier version (or another command) left it
    os.chmod(home, 0o755)
    log = GenerationLog(f"sqlite+aiosqlite:///{home / 'zephyr.db'}", home / "spill" / "generations.jsonl",
                        Metrics(), None, flush_seconds=0.01)
    await log.start()
    log.record(record("r1"))
    await log.flush()
    assert await log.count() == 1
    assert mode(home) == 0o700
    assert mode(home / "zephyr.db") == 0o600
    for leftover in home.glob("zephyr.db-*"):  # journals, if SQLite kept any
        assert mode(leftover) == 0o600
    await log.close()


async def test_spill_and_rejected_files_are_private(tmp_path, open_umask):
    db_dir = tmp_path / "db"
    spill = tmp_path / "home" / "spill" / "generations.jsonl"
    log = GenerationLog(f"sqlite+aiosqlite:///{db_dir / 'log.db'}", spill, Metrics(), None,
                        flush_seconds=0.01, retry_seconds=60)
    shutil.rmtree(db_dir)  # the database is unreachable from the start: rows spill
    await log.start()
    log.record(record("r1"))
    await log.flush()
    assert spill.exists()
    assert mode(spill) == 0o600 and mode(spill.parent) == 0o700 and mode(spill.parent.parent) == 0o700
    await log.close()

    db_dir.mkdir()
    spill.write_text(spill.read_text() + '{"id": "torn", "crea\n')  # a torn line goes to the rejected file
    os.chmod(spill, 0o644)  # as an earlier version wrote it
    restarted = GenerationLog(f"sqlite+aiosqlite:///{db_dir / 'log.db'}", spill, Metrics(), None)
    await restarted.start()
    await restarted.replayed_at_start()
    assert await restarted.count() == 1 and not restarted.has_spill()
    assert mode(restarted.rejected_path) == 0o600
    assert mode(db_dir / "log.db") == 0o600
    await restarted.close()


async def test_an_existing_spill_file_is_tightened_at_start(tmp_path):
    spill = tmp_path / "spill" / "generations.jsonl"
    spill.parent.mkdir(mode=0o755)
    os.chmod(spill.parent, 0o755)
    spill.write_text(json.dumps(row("old"), default=str) + "\n")
    os.chmod(spill, 0o644)
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'log.db'}", spill, Metrics(), None)
    shutil.rmtree(tmp_path / "missing")  # keep the file: the database cannot take it yet
    await log.start()
    assert mode(spill) == 0o600 and mode(spill.parent) == 0o700
    await log.close()


def test_sqlite_journals_are_tightened_and_other_databases_are_left_alone(tmp_path, open_umask):
    database = tmp_path / "zephyr.db"
    for path in (database, tmp_path / "zephyr.db-wal", tmp_path / "zephyr.db-shm", tmp_path / "zephyr.db-journal"):
        path.write_text("")
        os.chmod(path, 0o644)
    private_sqlite_files(database)
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
        "zephyr.db": 0o600, "zephyr.db-wal": 0o600, "zephyr.db-shm": 0o600, "zephyr.db-journal": 0o600}
    assert sqlite_path(f"sqlite+aiosqlite:///{database}") == database
    assert sqlite_path("sqlite+aiosqlite:///:memory:") is None
    assert sqlite_path("postgresql+asyncpg://u:p@host/db") is None


async def test_make_engine_creates_the_sqlite_file_private(tmp_path, open_umask):
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'new' / 'deeper' / 'zephyr.db'}")
    await engine.dispose()
    assert mode(tmp_path / "new") == 0o700 and mode(tmp_path / "new" / "deeper") == 0o700
    assert mode(tmp_path / "new" / "deeper" / "zephyr.db") == 0o600


def test_private_dir_leaves_a_shared_sticky_folder_alone(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    private_dir(shared)
    assert mode(shared) == 0o1777
    private_dir(shared / "ours")
    assert mode(shared / "ours") == 0o700


async def test_a_failed_statements_error_quotes_no_row(tmp_path):
    """The log and error handlers print a database error as it is: SQLAlchemy's text of one quotes its parameters,
    a student's message among them (found by a review)."""
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'zephyr.db'}")
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, message TEXT)"))
            await connection.execute(text("INSERT INTO t VALUES (1, 'first')"))
            with pytest.raises(IntegrityError) as failed:
                await connection.execute(text("INSERT INTO t VALUES (:id, :message)"),
                                         {"id": 1, "message": "my name is Jane Roe and I live at 12 Elm Street"})
    finally:
        await engine.dispose()
    assert "Jane Roe" not in str(failed.value) and "UNIQUE constraint failed" in str(failed.value)


def test_a_private_file_is_written_whole_or_not_at_all(tmp_path):
    """A review export was truncated and written in place: a stop or a full disk part way left a short file that
    `eval gate --reviews` and `data review` went on to read, counting fewer verdicts without a word."""
    import os

    from zephyr.paths import writing_atomically

    export = tmp_path / "export.jsonl"
    with writing_atomically(export, private=True) as handle:
        handle.write("first\n")
    assert export.read_text() == "first\n" and export.stat().st_mode & 0o777 == 0o600
    with pytest.raises(OSError), writing_atomically(export, private=True) as handle:
        handle.write("half of the second")
        raise OSError(28, os.strerror(28))  # the disk filled part way
    assert export.read_text() == "first\n" and os.listdir(tmp_path) == ["export.jsonl"]


def test_an_atomic_write_goes_through_a_link_keeps_a_shared_mode_and_writes_a_pipe_in_place(tmp_path):
    import os
    import threading

    from zephyr.paths import write_text_atomic

    target = tmp_path / "shared" / "data.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    target.chmod(0o640)
    link = tmp_path / "data.jsonl"
    link.symlink_to(target)
    write_text_atomic(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n" and target.stat().st_mode & 0o777 == 0o640
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    read = []
    reader = threading.Thread(target=lambda: read.append(pipe.read_text()))
    reader.start()
    write_text_atomic(pipe, "through a pipe\n")
    reader.join(10)
    assert read == ["through a pipe\n"] and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_an_atomic_write_to_a_device_writes_it_in_place_and_leaves_its_mode():
    """/dev/stdout resolved into /proc/PID/fd/pipe:[N] (no folder to write a partial in), and a private write
    chmod-ed the device."""
    import os

    from zephyr.paths import write_text_atomic

    before = os.stat("/dev/null").st_mode
    write_text_atomic("/dev/null", "nothing\n", private=True)
    assert os.stat("/dev/null").st_mode == before


def test_a_folder_named_dev_is_no_device(tmp_path, monkeypatch):
    from zephyr.paths import write_text_atomic

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "dev").mkdir(parents=True)
    write_text_atomic("out/dev/pairs.jsonl", "first\n")
    write_text_atomic("out/dev/pairs.jsonl", "second\n")  # replaced, not appended to
    assert (tmp_path / "out" / "dev" / "pairs.jsonl").read_text() == "second\n"
