import json
import shutil

from prometheus_client.parser import text_string_to_metric_families

from service.metrics import Metrics
from service.store.log import GenerationLog
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


async def test_rows_spill_while_the_database_is_gone_and_replay_when_it_returns(tmp_path):
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    metrics = Metrics()
    log = GenerationLog(f"sqlite+aiosqlite:///{db_dir / 'log.db'}", tmp_path / "spill.jsonl", metrics, None,
                        flush_seconds=0.01, retry_seconds=0.01)
    await log.start()
    log.record(row("r1"))
    await log.flush()
    assert await log.count() == 1

    shutil.rmtree(db_dir)  # the database disappears: writes fail
    await log.engine.dispose()
    for i in range(2, 6):
        log.record(row(f"r{i}"))
    await log.flush()
    assert log.has_spill()
    assert metrics.log_spilled_rows._value.get() == 4

    db_dir.mkdir()  # it comes back (empty, as after a restore): the schema is recreated and rows replayed
    log.record(row("r6"))
    await log.flush()
    log.record(row("r7"))
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
        log.record(row(f"q{i}"))
    await log.close()
    assert len((tmp_path / "spill.jsonl").read_text().splitlines()) == 3

    (tmp_path / "missing-dir").mkdir()
    restarted = GenerationLog(url, tmp_path / "spill.jsonl", Metrics(), None)
    await restarted.start()
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
    log.record(row("x1"))
    await log.flush()
    log.record(row("x2"))
    await log.flush()
    assert not log._writer.done()
    # x1 waits in the file a (failed) replay picked up; x2 in the fresh spill file
    kept = [tmp_path / "spill.replaying", tmp_path / "spill.jsonl"]
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
