import asyncio
import contextlib
import dataclasses
import json
import shutil

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import Metrics
from service.store.log import GenerationLog
from service.store.models import GenerationRecord
from tests.unit.conftest import STUDENT_KEY
from zephyr.pii import Redactor

CHAT = "/v1/chat/completions"
PII = "I am S1234567, mail me at jane.doe@school.edu or call +1 415-555-0132."


def metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_redactor_removes_emails_phones_and_student_ids_but_keeps_science():
    redactor = Redactor(["EMAIL_ADDRESS", "PHONE_NUMBER", "STUDENT_ID"], r"\b[A-Z]{1,3}\d{6,9}\b")
    text = redactor.redact(PII + " Light travels 299792 km/s; water boils at 100 C.")
    assert "jane.doe" not in text and "555-0132" not in text and "S1234567" not in text
    assert "<EMAIL_ADDRESS>" in text and "<PHONE_NUMBER>" in text and "<STUDENT_ID>" in text
    assert "299792 km/s" in text and "100 C" in text


async def test_each_request_is_logged_once_redacted_with_key_hash(served):
    r = await served.client.post(CHAT, json={"messages": [{"role": "user", "content": PII}], "max_tokens": 40,
                                             "user": "student-7"})
    request_id = r.json()["id"]
    mcq = await served.client.post("/mcq", json={"question": f"{PII} Which is a gas?", "options": ["Iron", "Neon"]})
    log = await served.flushed_log()
    row = await log.get(request_id)
    assert row["status"] == "ok" and row["route"] == "chat" and row["user"] == "student-7"
    user_text = row["messages"][-1]["content"]
    assert "jane.doe@school.edu" not in user_text and "<EMAIL_ADDRESS>" in user_text and "<STUDENT_ID>" in user_text
    assert "tutor@example.com" not in row["response"][0]["content"]  # the model's own output is redacted too
    assert row["api_key_hash"] == served.app.state.keyring.digest(STUDENT_KEY)
    assert STUDENT_KEY not in json.dumps(row, default=str)
    assert row["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    assert row["latency_ms"] >= row["ttft_ms"] >= 0
    mcq_row = await log.get(mcq.json()["id"])
    assert mcq_row["response"][0]["answer"] == mcq.json()["answer"]
    assert "<EMAIL_ADDRESS>" in mcq_row["messages"][-1]["content"]
    assert await log.count() == 2


async def test_openais_safety_identifier_is_logged_as_the_user(served):
    """The current `openai` client calls `user` deprecated in favour of `safety_identifier` (and `prompt_cache_key`);
    both were refused as unknown fields (found by a review)."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    ids = []
    for extra in ({"safety_identifier": "student-8", "prompt_cache_key": "unit-3"},
                  {"safety_identifier": "student-8", "user": "student-9"}):
        r = await served.client.post(CHAT, json={**body, **extra})
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    log = await served.flushed_log()
    assert [(await log.get(i))["user"] for i in ids] == ["student-8", "student-9"]  # `user` wins where both are
    r = await served.client.post(CHAT, json={**body, "safety_identifier": "x" * 257})
    assert r.status_code == 400 and r.json()["error"]["param"] == "safety_identifier"


async def test_metrics_move(served):
    before = (await served.client.get("/metrics")).text
    await served.client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    await served.client.post("/mcq", json={"question": "q", "options": ["a", "b"], "method": "letter"})
    await served.client.post(CHAT, json={"messages": []})
    await served.flushed_log()
    after = (await served.client.get("/metrics")).text
    route = "/v1/chat/completions"
    assert metric(after, "zephyr_http_requests_total", route=route, status="200") == \
        metric(before, "zephyr_http_requests_total", route=route, status="200") + 1
    assert metric(after, "zephyr_http_requests_total", route=route, status="400") == 1
    assert metric(after, "zephyr_completion_tokens_total", route="chat") == 4
    assert metric(after, "zephyr_mcq_answers_total", letter="B") == 1
    assert metric(after, "zephyr_time_to_first_token_seconds_count", route="chat") == 1
    assert metric(after, "zephyr_request_latency_seconds_count", route="/mcq") == 1
    assert metric(after, "zephyr_log_rows_written_total") == 2
    assert metric(after, "zephyr_engine_ready") == 1
    # Only chat's one finished answer was judged for looping; the MCQ request is not an answer of that kind.
    assert 'zephyr_answers_total{looping="true",route="chat"} 0.0' in before  # present before the first loop
    assert metric(after, "zephyr_answers_total", route="chat", looping="false") == 1
    assert 'route="mcq"' not in "\n".join(line for line in after.splitlines() if "zephyr_answers" in line)


async def test_finished_answers_say_whether_they_loop_in_the_log_and_the_metrics(served):
    """The live count uses the text suite's rule: an operator sees what the gate judged candidates on."""
    served.engine.reply = "Atoms are small. " + "They are made up of atoms. " * 8
    looping = (await served.client.post(CHAT, json={"messages": [{"role": "user", "content": "atoms?"}],
                                                    "max_tokens": 200})).json()["id"]
    served.engine.reply = "Plants make sugar from light, water and carbon dioxide in their leaves."
    plain = (await served.client.post(CHAT, json={"messages": [{"role": "user", "content": "plants?"}],
                                                  "stream": True})).text
    scored = await served.client.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 0})
    answered = await served.client.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 30, "n": 2})
    assert scored.status_code == answered.status_code == 200 and "data: [DONE]" in plain
    log = await served.flushed_log()
    entry = (await log.get(looping))["response"][0]
    assert entry["looping"] is True and entry["repeated_4gram_share"] > 0.5
    assert "looping" not in (await log.get(scored.json()["id"]))["response"][0]  # nothing shown: nothing judged
    text = (await served.client.get("/metrics")).text
    assert metric(text, "zephyr_answers_total", route="chat", looping="true") == 1
    assert metric(text, "zephyr_answers_total", route="chat", looping="false") == 1
    assert metric(text, "zephyr_answers_total", route="completions", looping="false") == 2  # n=2, not the score

async def test_rows_spill_while_the_database_is_gone_and_replay_when_it_returns(tmp_path):
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    metrics = Metrics()
    log = GenerationLog(f"sqlite+aiosqlite:///{db_dir / 'log.db'}", tmp_path / "spill.jsonl", metrics, None,
                        flush_seconds=0.01, retry_seconds=0.01)
    await log.start()
    log.record(record("r1"))
    await log.flush()
    assert await log.count() == 1

    shutil.rmtree(db_dir)  # the database disappears: writes fail
    await log.engine.dispose()
    for i in range(2, 6):
        log.record(record(f"r{i}"))
    await log.flush()
    assert log.has_spill()
    assert metrics.log_spilled_rows._value.get() == 4

    db_dir.mkdir()  # it comes back (empty, as after a restore): the schema is recreated and rows replayed
    log.record(record("r6"))
    await log.flush()
    log.record(record("r7"))
    await log.flush()
    assert not log.has_spill()
    assert {r for r in [f"r{i}" for i in range(2, 8)] if await log.get(r)} == {f"r{i}" for i in range(2, 8)}
    await log.close()


async def test_shutdown_flushes_the_queue_to_disk_and_a_restart_replays(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'log.db'}"
    metrics = Metrics()
    log = GenerationLog(url, tmp_path / "spill.jsonl", metrics, None, flush_seconds=5)
    shutil.rmtree(tmp_path / "missing-dir")  # unreachable from the start
    await log.start()
    for i in range(3):
        log.record(record(f"q{i}"))
    await log.close()
    assert len((tmp_path / "spill.jsonl").read_text().splitlines()) == 3

    (tmp_path / "missing-dir").mkdir()
    restarted = GenerationLog(url, tmp_path / "spill.jsonl", Metrics(), None)
    await restarted.start()
    await restarted.replayed_at_start()
    assert await restarted.count() == 3 and not restarted.has_spill()
    await restarted.close()


def row(request_id: str) -> dict:
    from datetime import UTC, datetime

    return {
        "id": request_id, "created_at": datetime.now(UTC), "route": "chat", "model": "m", "api_key_hash": None,
        "role": "admin", "user": None, "status": "ok", "messages": [{"role": "user", "content": "hi"}],
        "response": [{"index": 0, "content": "hello"}], "params": {}, "prompt_tokens": 1, "completion_tokens": 1,
        "ttft_ms": 1.0, "latency_ms": 2.0, "error": None, "review_requested": False,
    }


def record(request_id: str) -> GenerationRecord:
    """`row` as the log takes it."""
    return GenerationRecord.from_dict(row(request_id))


async def test_a_torn_line_or_refused_row_is_set_aside_not_blocking_replay(tmp_path):
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None,
                        flush_seconds=0.01)
    await log.start()
    good, refused = row("good"), {**row("refused"), "prompt_tokens": None}  # NOT NULL column
    spill = "".join(json.dumps(r, default=str) + "\n" for r in (good, refused)) + '{"id": "torn", "crea'
    (tmp_path / "spill.jsonl").write_text(spill)
    assert await log.replay_spill() == 1
    assert await log.get("good") and not log.has_spill()
    kept = [json.loads(line) for line in log.rejected_path.read_text().splitlines()]
    assert sorted(r.get("id", "torn line") for r in kept) == ["refused", "torn line"]
    await log.close()


async def test_the_writer_survives_a_failing_redactor_and_keeps_the_rows(tmp_path):
    class Broken:
        def redact(self, text):
            raise RuntimeError("boom")

    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), Broken(),
                        flush_seconds=0.01)
    await log.start()
    log.record(record("x1"))
    await log.flush()
    log.record(record("x2"))
    await log.flush()
    assert not log._writer.done()
    # x1 waits in the file a (failed) replay picked up; x2 in the fresh spill file
    kept = [*tmp_path.glob("spill*.replaying"), tmp_path / "spill.jsonl"]
    ids = [json.loads(line)["id"] for path in kept if path.exists() for line in path.read_text().splitlines()]
    assert ids == ["x1", "x2"]
    await log.close()


async def test_a_long_user_field_is_truncated_after_redaction(served):
    r = await served.client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                             "user": "AB123456 x " * 23})
    row_ = await (await served.flushed_log()).get(r.json()["id"])
    assert row_["user"].startswith("<STUDENT_ID>") and len(row_["user"]) == 256


async def test_rows_spilled_unredacted_are_redacted_before_replay(tmp_path):
    redactor = Redactor(["EMAIL_ADDRESS"], r"\bS\d{7}\b")
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), redactor,
                        flush_seconds=0.01)
    await log.start()
    raw = {**row("raw"), "messages": [{"role": "user", "content": "write to ann@uni.edu"}]}
    (tmp_path / "spill.jsonl").write_text(json.dumps(raw, default=str) + "\n")  # as _spill_safely's fallback does
    assert await log.replay_spill() == 1
    assert (await log.get("raw"))["messages"][0]["content"] == "write to <EMAIL_ADDRESS>"
    await log.close()


class HeldRedactor:
    """Redacts nothing, and holds every call until released: a replay as slow as a long outage's spill."""

    def __init__(self):
        import threading

        self.reached, self.release = threading.Event(), threading.Event()

    def redact(self, text: str) -> str:
        self.reached.set()
        assert self.release.wait(30)
        return text


async def test_the_start_serves_at_once_and_replays_a_spill_in_the_background(tmp_path):
    held = HeldRedactor()
    (tmp_path / "spill.jsonl").write_text(json.dumps(row("spilled"), default=str) + "\n")  # raw: redacted on replay
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), held,
                        flush_seconds=0.01)
    await asyncio.wait_for(log.start(), 10)  # returns while the replay is held
    # the writer neither waits for the replay nor starts another
    log.record(dataclasses.replace(record("new"), redacted=True))
    await asyncio.wait_for(log.flush(), 10)
    assert await log.get("new") and not await log.get("spilled") and log.has_spill()
    held.release.set()
    await asyncio.wait_for(log.replayed_at_start(), 30)
    assert await log.get("spilled") and not log.has_spill() and await log.count() == 2
    await log.close()


async def test_a_close_during_the_start_replay_leaves_the_spill_for_the_next_start(tmp_path):
    held = HeldRedactor()
    (tmp_path / "spill.jsonl").write_text(json.dumps(row("spilled"), default=str) + "\n")
    url = f"sqlite+aiosqlite:///{tmp_path / 'log.db'}"
    log = GenerationLog(url, tmp_path / "spill.jsonl", Metrics(), held)
    await log.start()
    assert await asyncio.to_thread(held.reached.wait, 10)  # the replay is part way: a row taken, held
    await asyncio.wait_for(log.close(), 10)  # does not wait for it
    assert log._startup_replay.cancelled()
    held.release.set()
    assert log.has_spill()
    restarted = GenerationLog(url, tmp_path / "spill.jsonl", Metrics(), None)
    await restarted.start()
    await restarted.replayed_at_start()
    assert await restarted.get("spilled") and not restarted.has_spill()
    await restarted.close()


# The typed row and the spill file's format ------------------------------------------------------------------


def test_the_typed_row_has_the_tables_columns_in_order():
    from service.store.models import COLUMN_NAMES, Generation

    assert COLUMN_NAMES == tuple(column.name for column in Generation.__table__.columns)


# A spill file as the dict-based log (before GenerationRecord) wrote it: `json.dumps(row, default=...)` of the
# dict the tutor built, created_at in ISO 8601, `"_redacted": true` after redaction; and an older row without the
# review columns, written with `default=str` as the tests above do.
OLD_SPILL = (
    '{"id": "old-1", "created_at": "2026-11-20T10:00:00.123456+00:00", "route": "chat", "model": "m", '
    '"api_key_hash": "abc", "role": "student", "user": "<EMAIL_ADDRESS>", "status": "ok", '
    '"messages": [{"role": "user", "content": "mail <EMAIL_ADDRESS>"}], '
    '"response": [{"index": 0, "content": "hello", "finish_reason": "stop"}], '
    '"params": {"max_tokens": 5, "temperature": 1.0, "top_p": 1.0, "n": 1, "stop": [], "seed": null, '
    '"presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": null, "prompt_logprobs": false, '
    '"skip_reading_prefix_cache": null, "stream": false}, "prompt_tokens": 7, "completion_tokens": 5, '
    '"ttft_ms": 1.5, "latency_ms": 9.25, "error": null, "review_requested": true, "purpose": "served", '
    '"parent_id": null, "review_kind": "pair", "_redacted": true}\n'
    '{"id": "old-2", "created_at": "2026-11-20 10:00:01+00:00", "route": "mcq", "model": "m", "api_key_hash": null, '
    '"role": "admin", "user": null, "status": "error", '
    '"messages": [{"role": "user", "content": "q from ann@uni.edu"}], '
    '"response": [{"index": 0, "content": "", "answer": null, "probabilities": {}, "confidence": 0.0, '
    '"abstained": false, "scores": {}}], "params": {"method": "cloze"}, "prompt_tokens": 3, '
    '"completion_tokens": 0, "ttft_ms": null, "latency_ms": 2.0, "error": "refused"}\n'
)


async def test_a_spill_file_in_the_old_dict_form_replays(tmp_path):
    redactor = Redactor(["EMAIL_ADDRESS"], r"\bS\d{7}\b")
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), redactor,
                        flush_seconds=0.01)
    await log.start()
    (tmp_path / "spill.jsonl").write_text(OLD_SPILL)
    assert await log.replay_spill() == 2 and not log.has_spill() and not log.rejected_path.exists()
    first, second = await log.get("old-1"), await log.get("old-2")
    expected = json.loads(OLD_SPILL.splitlines()[0])
    del expected["_redacted"], expected["created_at"]
    assert {k: first[k] for k in expected} == expected  # stored as written (already redacted)
    assert first["created_at"].replace(tzinfo=None).isoformat() == "2026-11-20T10:00:00.123456"
    assert (second["status"], second["error"], second["ttft_ms"]) == ("error", "refused", None)
    assert second["messages"][0]["content"] == "q from <EMAIL_ADDRESS>"  # spilled unredacted: redacted now
    # the review columns it predates take the table's defaults
    assert (second["purpose"], second["parent_id"], second["review_kind"], second["review_requested"]) == (
        "served", None, None, False)
    await log.close()


def test_a_record_spills_as_the_old_dict_form_did():
    from datetime import UTC, datetime

    from service.store.models import COLUMN_NAMES

    old = json.loads(OLD_SPILL.splitlines()[0])
    again = GenerationRecord.from_dict(old)
    assert again.redacted and again.created_at == datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=UTC)
    assert again.to_json_line() == OLD_SPILL.splitlines(keepends=True)[0]  # byte for byte
    # no `_redacted` key yet, nor a model time not known
    assert list(GenerationRecord.from_dict(row("r")).to_json()) == [c for c in COLUMN_NAMES if c != "model_revision"]


async def test_a_spilled_line_that_is_no_row_is_set_aside(tmp_path):
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None,
                        flush_seconds=0.01)
    await log.start()
    missing = {k: v for k, v in row("missing").items() if k != "latency_ms"}
    lines = [row("good"), {**row("unknown"), "colour": "red"}, missing, ["a", "list"]]
    (tmp_path / "spill.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in lines))
    assert await log.replay_spill() == 1
    assert await log.get("good") and await log.count() == 1 and not log.has_spill()
    kept = [json.loads(line) for line in log.rejected_path.read_text().splitlines()]
    assert [r.get("id", r.get("unparseable_line")) for r in kept] == ["unknown", "missing", '["a", "list"]']
    await log.close()


async def test_a_full_queue_spills_off_the_event_loop_and_loses_nothing(tmp_path):
    """Redaction and fsync would stall every open stream if they ran on the loop that record() is called on."""
    import asyncio
    import threading

    class Watching:
        threads: set[str] = set()

        def redact(self, text):
            self.threads.add(threading.current_thread().name)
            return text

    redactor = Watching()
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), redactor,
                        flush_seconds=0.01, queue_size=1)
    await log.start()
    insert, released = log._insert, asyncio.Event()

    async def slow_insert(rows):  # a database that has stopped answering for now
        await released.wait()
        await insert(rows)

    log._insert = slow_insert
    for i in range(6):
        log.record(record(f"r{i}"))
    assert threading.current_thread().name not in redactor.threads  # nothing was redacted on the loop
    released.set()
    await log.flush()
    spilled = log.metrics.registry.get_sample_value("zephyr_log_spilled_rows_total")
    assert spilled >= 4  # one row in the writer's hands, one queued, the rest spilled
    if log.has_spill():  # the writer may have replayed them already
        await log.replay_spill()
    assert await log.count() == 6
    assert threading.current_thread().name not in redactor.threads
    await log.close()


async def test_a_replay_cut_short_keeps_the_file_and_a_retry_inserts_each_row_once(tmp_path):
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None,
                        flush_seconds=0.01, batch_size=2)
    await log.start()
    lines = [json.dumps(row(f"s{i}"), default=str) for i in range(5)]
    (tmp_path / "spill.jsonl").write_text("\n".join([*lines[:3], '{"torn', *lines[3:]]) + "\n")
    insert, calls = log._insert, []

    async def failing_second_batch(rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise ConnectionError("database went away")
        await insert(rows)

    async def unreachable() -> bool:
        return False

    log._insert, log._reachable = failing_second_batch, unreachable
    assert await log.replay_spill() == 0 and log.has_spill() and await log.count() == 2  # the first batch went in
    log._insert = insert
    assert await log.replay_spill() == 5 and not log.has_spill()  # again from the start: s0, s1 ignored by id
    assert await log.count() == 5
    [torn] = [json.loads(line) for line in log.rejected_path.read_text().splitlines()]
    assert torn.pop("unparseable_line") == '{"torn' and "T" in torn.pop("_set_aside_at") and not torn
    await log.close()


async def test_a_database_lost_while_rows_are_tried_one_by_one_refuses_none_of_them(tmp_path):
    """A batch the database refused is tried a row at a time; the database going away meanwhile is no row's fault:
    the file stays for the next try, and nothing is set aside as refused."""
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None,
                        flush_seconds=0.01, batch_size=3)
    await log.start()
    (tmp_path / "spill.jsonl").write_text("".join(json.dumps(row(f"s{i}"), default=str) + "\n" for i in range(3)))
    insert, reachable = log._insert, log._reachable
    up = {"database": True}

    async def refusing_batches_then_down(rows):
        if len(rows) > 1:
            raise ValueError("one row of these is refused")
        if rows[0].id == "s1":
            up["database"] = False  # gone while this row was being written
            raise ConnectionError("database went away")
        await insert(rows)

    async def database_up() -> bool:
        return up["database"] and await reachable()

    log._insert, log._reachable = refusing_batches_then_down, database_up
    assert await log.replay_spill() == 0 and log.has_spill() and await log.get("s0")
    assert not log.rejected_path.exists()
    log._insert, log._reachable = insert, reachable
    assert await log.replay_spill() == 3 and await log.count() == 3 and not log.rejected_path.exists()
    await log.close()


@pytest.mark.parametrize("failure", ["database is locked", "database or disk is full",
                                     "cannot execute INSERT in a read-only transaction"])
async def test_a_database_that_fails_itself_while_reachable_refuses_no_row(tmp_path, failure):
    """A lock held past the timeout, a full disk, a server read-only after a failover: `SELECT 1` still succeeds, and
    each row tried alone was set aside as refused, a whole outage's spill at once (found by a review)."""
    from sqlalchemy.exc import OperationalError

    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None,
                        flush_seconds=0.01, batch_size=2)
    await log.start()
    (tmp_path / "spill.jsonl").write_text("".join(json.dumps(row(f"s{i}"), default=str) + "\n" for i in range(3)))
    insert = log._insert

    async def failing(rows):
        raise OperationalError("INSERT INTO generations ...", {}, Exception(failure))

    log._insert = failing
    assert await log.replay_spill() == 0 and log.has_spill() and not log.rejected_path.exists()
    log._insert = insert
    assert await log.replay_spill() == 3 and await log.count() == 3 and not log.rejected_path.exists()
    await log.close()


def test_only_what_a_row_holds_is_its_fault():
    from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, StatementError

    from service.store.log import refused_for_its_rows

    class AsyncpgError(Exception):  # as SQLAlchemy's asyncpg adapter hands on a class 22 error
        def __init__(self, sqlstate):
            super().__init__(sqlstate)
            self.sqlstate = sqlstate

    assert refused_for_its_rows(IntegrityError("INSERT", {}, Exception("NOT NULL constraint failed")))
    assert refused_for_its_rows(DBAPIError("INSERT", {}, AsyncpgError("22001")))  # value too long for its column
    assert refused_for_its_rows(StatementError("could not bind", "INSERT", {}, TypeError("not JSON")))
    assert not refused_for_its_rows(DBAPIError("INSERT", {}, AsyncpgError("25006")))  # read-only transaction
    assert not refused_for_its_rows(OperationalError("INSERT", {}, Exception("database is locked")))
    assert not refused_for_its_rows(ConnectionError("gone"))
    assert refused_for_its_rows(OverflowError("Python int too large to convert to SQLite INTEGER"))


async def test_a_spilled_row_sqlite_cannot_bind_is_set_aside_not_blocking_replay(tmp_path):
    """A value of a type no column takes (a hand-edited or older spill line) fails as SQLite's ProgrammingError:
    taken for the database's own failure, it held the file, and every file after it, for good (found by a review)."""
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None,
                        flush_seconds=0.01)
    await log.start()
    lines = [row("good"), {**row("odd"), "model": {"not": "text"}}, {**row("huge"), "prompt_tokens": 2**70}]
    (tmp_path / "spill.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in lines))
    assert await log.replay_spill() == 1 and await log.get("good") and not log.has_spill()
    kept = [json.loads(line)["id"] for line in log.rejected_path.read_text().splitlines()]
    assert sorted(kept) == ["huge", "odd"]
    await log.close()


async def test_a_close_that_times_out_while_a_batch_is_gathered_spills_its_rows(tmp_path, monkeypatch):
    from service.store import log as log_module

    monkeypatch.setattr(log_module, "CLOSE_TIMEOUT_SECONDS", 0.2)
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None,
                        flush_seconds=30)  # the writer waits for more rows before it writes
    await log.start()
    log.record(record("gathered"))
    await asyncio.sleep(0.05)  # the writer took it off the queue
    assert log.queue.empty()
    await log.close()
    assert [json.loads(line)["id"] for line in (tmp_path / "spill.jsonl").read_text().splitlines()] == ["gathered"]


async def test_a_batch_the_writer_takes_while_the_start_replay_stops_is_spilled(tmp_path, monkeypatch):
    """close() read the rows in flight before stopping the start's replay; while that replay unwound, the writer
    stored its batch and took the next, and the writer's stop then dropped that one: in neither place."""
    from service.store import log as log_module

    monkeypatch.setattr(log_module, "CLOSE_TIMEOUT_SECONDS", 0.2)  # r0's insert waits for the replay's stop
    (tmp_path / "spill.jsonl").write_text(json.dumps(row("old"), default=str) + "\n")
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None,
                        batch_size=1, flush_seconds=0.01)
    stored, inserting, first_may_end, second_started = [], asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_replay():
        async with log._replay_lock:  # as the replay holds it: the writer does not start another
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:  # a rollback on a slow database: the writer goes on meanwhile
                first_may_end.set()
                await asyncio.wait_for(second_started.wait(), 10)
                raise

    async def slow_insert(rows):
        if not stored and not second_started.is_set() and not first_may_end.is_set():
            inserting.set()
            await first_may_end.wait()
            stored.extend(r.id for r in rows)
        else:
            second_started.set()
            await asyncio.Event().wait()

    monkeypatch.setattr(log, "replay_spill", slow_replay)
    await log.start()
    monkeypatch.setattr(log, "_insert", slow_insert)
    log.record(record("r0"))
    log.record(record("r1"))
    await asyncio.wait_for(inserting.wait(), 10)
    await log.close()
    spilled = [json.loads(line)["id"] for line in (tmp_path / "spill.jsonl").read_text().splitlines()]
    assert stored == ["r0"] and "r1" in spilled


async def test_a_row_appended_after_a_torn_line_is_replayed(tmp_path):
    """A kill mid-append leaves the spill file's last line cut off: the next row spilled joined it, and both were
    set aside as one unreadable line."""
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None)
    (tmp_path / "spill.jsonl").write_text(json.dumps(row("whole"), default=str) + '\n{"id": "torn", "crea')
    log._spill([record("after")])
    await log.start()
    await log.replayed_at_start()
    assert await log.get("whole") and await log.get("after")
    (set_aside,) = [json.loads(line) for line in log.rejected_path.read_text().splitlines()]
    assert set_aside["unparseable_line"] == '{"id": "torn", "crea'  # the fragment alone
    await log.close()


async def test_a_database_url_holding_a_percent_sign_is_written_to(tmp_path):
    """Alembic read `%` as its interpolation: every start failed and every row went to the spill file (an Azure
    user `name@server` is `name%40server` in a URL)."""
    from service.store.log import alembic_config

    folder = tmp_path / "100%"
    folder.mkdir()
    log = GenerationLog(f"sqlite+aiosqlite:///{folder / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None,
                        flush_seconds=0.01)
    await log.start()
    log.record(record("stored"))
    await log.flush()
    assert await log.get("stored") and not log.has_spill()
    await log.close()
    url = "postgresql+asyncpg://zephyr%40myserver:p%25ss@db.example/zephyr"
    assert alembic_config(url).get_main_option("sqlalchemy.url") == url


async def test_a_row_recorded_after_the_log_closed_is_spilled_not_lost(tmp_path):
    """uvicorn cancels the requests left at its stop and shuts the app down without waiting for them: a cancelled
    request's row could come after the log had taken its queue, into a queue nobody read."""
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None)
    await log.start()
    await log.close()
    log.record(record("late"))
    assert [json.loads(line)["id"] for line in (tmp_path / "spill.jsonl").read_text().splitlines()] == ["late"]


# Replicas sharing one volume share the spill file ------------------------------------------------------------

HOLD_LOCK = """
import fcntl, sys, time
with open(sys.argv[1], "a") as handle:
    fcntl.lockf(handle, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    if len(sys.argv) > 3:
        with open(sys.argv[3], "a") as spill:
            spill.write(sys.argv[4] + "\\n")
"""


def another_replica_holding(path, seconds: float, then_append_to=None, line: str = ""):
    """A process of its own (POSIX locks do not exclude within one) holding a lock on `path`."""
    import subprocess
    import sys

    extra = [str(then_append_to), line] if then_append_to else []
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(seconds), *extra],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


async def test_a_file_a_dead_replica_took_for_replay_is_replayed_by_the_next_start(tmp_path):
    (tmp_path / "spill.3f2a9c.replaying").write_text(json.dumps(row("orphan"), default=str) + "\n")
    (tmp_path / "spill.replaying").write_text(json.dumps(row("older"), default=str) + "\n")  # an earlier version's
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None)
    await log.start()
    await log.replayed_at_start()
    assert await log.get("orphan") and await log.get("older") and not log.has_spill()
    await log.close()


async def test_a_taken_file_another_replica_is_replaying_is_left_to_it(tmp_path):
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None)
    await log.start()
    taken = tmp_path / "spill.5b1e0d.replaying"
    taken.write_text(json.dumps(row("theirs"), default=str) + "\n")
    holder = another_replica_holding(taken, 30)
    try:
        assert await log.replay_spill() == 0 and taken.exists() and not await log.get("theirs")
    finally:
        holder.kill()
        holder.wait()
    assert await log.replay_spill() == 1 and not taken.exists()  # its replica died part way: ours now
    await log.close()


def test_a_spill_waits_for_another_replicas_append(tmp_path):
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None)
    spill = tmp_path / "spill.jsonl"
    holder = another_replica_holding(tmp_path / "spill.lock", 1.0, then_append_to=spill, line='{"theirs": 1}')
    log._spill([record("ours")])  # waits for the other replica's lock, so its line stays whole and first
    holder.wait()
    lines = spill.read_text().splitlines()
    assert lines[0] == '{"theirs": 1}' and json.loads(lines[1])["id"] == "ours"


class Poisoned:
    """Redacts emails, and fails on one text: a row the redactor cannot read (found by a review of the log)."""

    def __init__(self):
        self.inner = Redactor(["EMAIL_ADDRESS"], r"\bS\d{7}\b")

    def redact(self, text):
        if "POISON" in text:
            raise RuntimeError("the redactor fails on this text")
        return self.inner.redact(text)


async def test_one_row_the_redactor_fails_on_neither_spills_its_batch_raw_nor_blocks_the_replay(tmp_path):
    """One such row sent its whole batch to the spill file unredacted (students' emails on disk); at replay it
    failed again and blocked that file, and every file after it, forever."""
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), Poisoned(),
                        flush_seconds=0.01, batch_size=8)
    await log.start()
    poisoned = dataclasses.replace(record("bad"), messages=[{"role": "user", "content": "POISON jane@school.edu"}])
    fine = dataclasses.replace(record("fine"), messages=[{"role": "user", "content": "hello jane@school.edu"}])
    log.record(poisoned)
    log.record(fine)
    await log.flush()
    assert (await log.get("fine"))["messages"][0]["content"] == "hello <EMAIL_ADDRESS>"  # written, redacted
    # only the row the redactor fails on went to disk as it is (the writer's replay has set it aside since)
    on_disk = "".join(path.read_text() for path in tmp_path.iterdir() if path.suffix != ".db" and path.is_file())
    assert "POISON jane@school.edu" in on_disk and "hello jane@school.edu" not in on_disk
    # a replay sets it aside, and replays the rows spilled after it
    later = {**row("later"), "messages": [{"role": "user", "content": "from ann@uni.edu"}]}
    with (tmp_path / "spill.jsonl").open("a") as out:
        out.write(json.dumps(later, default=str) + "\n")
    await log.replay_spill()
    assert (await log.get("later"))["messages"][0]["content"] == "from <EMAIL_ADDRESS>"
    assert not log.has_spill() and not await log.get("bad")
    kept = [json.loads(line) for line in log.rejected_path.read_text().splitlines()]
    assert [entry["unredactable_row"]["id"] for entry in kept] == ["bad"]
    await log.close()


async def test_a_spilled_row_without_a_time_is_set_aside_not_a_replay_that_fails_every_time(tmp_path):
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None,
                        flush_seconds=0.01)
    await log.start()
    rows = [row("good1"), {**row("bad"), "created_at": None}, row("good2")]
    (tmp_path / "spill.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    assert await log.replay_spill() == 2
    assert not log.has_spill() and await log.get("good2")
    assert [json.loads(line)["id"] for line in log.rejected_path.read_text().splitlines()] == ["bad"]
    await log.close()


async def test_another_spill_paths_files_in_the_same_folder_are_not_replayed(tmp_path):
    """"spill*.replaying" also matched spill2.<id>.replaying: one service replayed another's rows into its own
    database (found by a review of the log)."""
    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), None,
                        flush_seconds=0.01)
    await log.start()
    (tmp_path / "spill2.abc.replaying").write_text(json.dumps(row("theirs"), default=str) + "\n")
    (tmp_path / "spill.v2.0123456789ab.replaying").write_text(json.dumps(row("dotted"), default=str) + "\n")
    (tmp_path / "spill.0123456789ab.replaying").write_text(json.dumps(row("ours"), default=str) + "\n")
    (tmp_path / "spill.replaying").write_text(json.dumps(row("older"), default=str) + "\n")  # an older version's
    assert await log.replay_spill() == 2
    assert await log.get("ours") and await log.get("older")
    assert not await log.get("theirs") and not await log.get("dotted")
    assert (tmp_path / "spill2.abc.replaying").exists()
    await log.close()


async def test_a_broken_redactor_leaves_the_raw_rows_waiting_even_after_redacted_ones(tmp_path):
    """Rows spilled redacted (a database outage) passed the redactor by: with raw rows after them while the redactor
    was broken, the raw ones were set aside for good as if each alone could not be redacted (found by a review)."""
    class Broken:
        def redact(self, text):
            raise RuntimeError("the analyzer is not loaded")

    log = GenerationLog(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", tmp_path / "spill.jsonl", Metrics(), Broken(),
                        flush_seconds=0.01)
    await log.start()
    done = {**row("done"), "_redacted": True}
    (tmp_path / "spill.jsonl").write_text(json.dumps(done, default=str) + "\n" + json.dumps(row("raw"), default=str)
                                          + "\n")
    with contextlib.suppress(Exception):
        await log.replay_spill()
    assert log.has_spill() and not log.rejected_path.exists() and not await log.get("raw")
    await log.close()
